"""Paged optimizer state: AdamW's moments in pages that can be evicted to host memory.

QLoRA's third idea (seed article 003, "统一内存分页"; Dettmers et al. 2023, §3): allocate the
optimizer state in NVIDIA *unified memory*, so that when a memory spike (a mini-batch with a long
sequence) needs more GPU memory than is free, the driver pages the state out to CPU RAM instead of
failing with out-of-memory, and pages it back when the optimizer update touches it.

How the real thing works (what this module imitates):

* **CUDA unified memory (UVM).** ``cudaMallocManaged`` returns one address valid on host and
  device. Memory is tracked in pages (the driver migrates 4 KiB - 2 MiB at a time; 2 MiB is the
  large-page size). A GPU access to a page that is on the host *faults* and the page migrates over
  PCIe; when the GPU is oversubscribed, the driver evicts pages to host RAM, least recently used
  first (a dirty page is copied back). ``cudaMemPrefetchAsync`` moves pages ahead of use (a hint;
  results never depend on it).
* **bitsandbytes** (``is_paged=True``, e.g. ``PagedAdamW32bit``): only the optimizer state of
  large tensors (>= 1e5 elements) goes into managed memory (``get_paged`` -> ``cudaMallocManaged``);
  before each parameter's update it calls ``prefetch_tensor`` (``cudaMemPrefetchAsync``) on that
  parameter's state. Weights, gradients and activations stay in ordinary device memory. When all
  of it fits, nothing is ever paged and paging costs nothing (the bnb docs).

What minilora does:

* :class:`PagedAdamW` is :class:`minilora.optim.AdamW` with its state placed differently: all
  moments ``m, v`` of the trainable parameters are views into one flat buffer (an *arena*, whole
  pages long, each parameter's ``m`` and ``v`` side by side), made by
  :func:`minilora.backend.managed_zeros`. On CuPy that buffer is CUDA managed memory and each
  update is preceded by a prefetch of that parameter's state, as bitsandbytes does. The update
  maths is AdamW's own (inherited, not copied), so a paged run gives bit-identical numbers.
* :class:`DeviceMemory` is the NumPy simulation of a GPU with ``budget_bytes`` of memory. It holds
  *non-pageable* allocations (weights, gradients, activations: :meth:`~DeviceMemory.allocate`) and
  the *pageable* state pages. A state page is in one of three places: not yet touched (no memory
  anywhere), on the device, or on the host. The rules:

  - first touch of a page puts it on the device (no transfer: the zero fill happens there);
  - touching a page on the host is a **page-in** (``page_bytes`` over PCIe);
  - whenever non-pageable bytes + resident pages would exceed the budget, resident pages are
    evicted least-recently-used first, each a **page-out** (``page_bytes`` over PCIe: optimizer
    state is rewritten every step, so evicted pages are always dirty);
  - if the non-pageable bytes alone exceed the budget, or not even one page fits when the update
    needs one, :class:`DeviceOutOfMemory` (paging moves only the optimizer state; a real GPU would
    fail there too).

  It counts page-ins, page-outs and bytes moved, and models their time as
  ``bytes / bandwidth_bytes_per_s`` (default 16 GB/s, PCIe 3.0 x16 nominal; PCIe 4.0 x16 is
  about 25 GB/s in practice). That is a lower bound: it leaves out fault-handling latency and the
  fact that a fault stalls the kernel that touched the page.

* :func:`paged_demo` fine-tunes the shipped base model with one long-sequence batch in the middle
  and writes a per-step trace (``minilora paged-demo`` -> ``results/paged/trace.json``, figure
  ``paged`` in ``minilora figures``).

Chapter: chapters/05-lora-and-qlora.ipynb (section 10, the saved trace of ``minilora paged-demo``)
"""
from __future__ import annotations

import math
from collections import OrderedDict

from minilora import backend
from minilora.errors import MiniloraError, UsageError
from minilora.optim import AdamW

MiB = 1 << 20
PAGE_BYTES = 2 * MiB  # CUDA's large page; bitsandbytes' paged buffers migrate in these units
PCIE_BYTES_PER_S = 16e9  # PCIe 3.0 x16 nominal; configurable everywhere it is used
ALIGN = 256  # byte alignment of each moment inside the arena (cudaMalloc aligns to 256)


class DeviceOutOfMemory(MiniloraError, MemoryError):
    """The simulated device cannot hold what is asked of it even after paging out all state."""


def check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise UsageError(f"{name} must be a whole number of bytes, got {value!r}")
    if int(value) < minimum:
        raise UsageError(f"{name} must be >= {minimum}, got {int(value)}")
    return int(value)


class DeviceMemory:
    """A simulated GPU memory of ``budget_bytes`` with LRU paging of state pages to host.

    Args:
        budget_bytes: device memory available to this training process.
        page_bytes: the paging unit (default 2 MiB, CUDA's large page).
        bandwidth_bytes_per_s: host <-> device bandwidth of the cost model (default 16e9).

    Counters (cumulative; :meth:`counters` returns them with the modelled time):
        ``page_ins``, ``page_outs`` (events), ``bytes_in``, ``bytes_out``, ``first_touches``
        (pages placed on the device for the first time, no transfer), ``peak_bytes`` (largest
        non-pageable + resident bytes seen, always <= the budget).
    """

    def __init__(self, budget_bytes: int, page_bytes: int = PAGE_BYTES,
                 bandwidth_bytes_per_s: float = PCIE_BYTES_PER_S):
        self.page_bytes = check_int("page_bytes", page_bytes, 1)
        self.budget_bytes = check_int("budget_bytes", budget_bytes, 0)
        if self.budget_bytes < self.page_bytes:
            raise UsageError(f"budget_bytes ({self.budget_bytes}) is smaller than one page "
                             f"({self.page_bytes} bytes): the device could never hold any state; "
                             "give a budget of at least one page or smaller pages")
        bw = bandwidth_bytes_per_s
        if isinstance(bw, bool) or not isinstance(bw, (int, float)) or not math.isfinite(bw) or bw <= 0:
            raise UsageError(f"bandwidth_bytes_per_s must be a positive finite number, got {bw!r}")
        self.bandwidth_bytes_per_s = float(bw)
        self._fixed: dict[str, int] = {}  # tag -> bytes of non-pageable memory
        self._regions: dict[int, int] = {}  # region id -> number of pages
        self._resident: OrderedDict = OrderedDict()  # (region, page) -> None; LRU first
        self._on_host: set = set()
        self._next_region = 0
        self.page_ins = self.page_outs = self.first_touches = 0
        self.bytes_in = self.bytes_out = 0
        self.peak_bytes = 0

    # -- sizes ------------------------------------------------------------------------------------
    @property
    def fixed_bytes(self) -> int:
        """Non-pageable bytes on the device (weights, gradients, activations, ...)."""
        return sum(self._fixed.values())

    @property
    def resident_bytes(self) -> int:
        """Bytes of state pages now on the device."""
        return len(self._resident) * self.page_bytes

    @property
    def host_bytes(self) -> int:
        """Bytes of state pages now paged out to host RAM."""
        return len(self._on_host) * self.page_bytes

    @property
    def used_bytes(self) -> int:
        return self.fixed_bytes + self.resident_bytes

    def resident_pages(self) -> list:
        """``(region, page)`` of every resident page, least recently used first."""
        return list(self._resident)

    def transfer_seconds(self, nbytes: int) -> float:
        """Modelled time to move ``nbytes`` over the host link: ``nbytes / bandwidth``."""
        return nbytes / self.bandwidth_bytes_per_s

    def counters(self) -> dict:
        """A snapshot of the counters, sizes and the modelled transfer time so far."""
        return {"page_ins": self.page_ins, "page_outs": self.page_outs,
                "first_touches": self.first_touches, "bytes_in": self.bytes_in,
                "bytes_out": self.bytes_out,
                "modelled_s": self.transfer_seconds(self.bytes_in + self.bytes_out),
                "fixed_bytes": self.fixed_bytes, "resident_bytes": self.resident_bytes,
                "host_bytes": self.host_bytes, "used_bytes": self.used_bytes,
                "peak_bytes": self.peak_bytes}

    def reset_peak(self) -> None:
        self.peak_bytes = self.used_bytes

    # -- non-pageable memory ---------------------------------------------------------------------
    def allocate(self, tag: str, nbytes: int) -> None:
        """Take ``nbytes`` of ordinary (non-pageable) device memory under the name ``tag``,
        evicting state pages (LRU first) to make room.

        Raises :class:`DeviceOutOfMemory` (and changes nothing) if the non-pageable bytes alone
        would exceed the budget.
        """
        nbytes = check_int(f"allocation {tag!r}", nbytes, 0)
        if tag in self._fixed:
            raise UsageError(f"allocation {tag!r} exists already; free it first")
        need = self.fixed_bytes + nbytes
        if need > self.budget_bytes:
            raise DeviceOutOfMemory(
                f"allocating {tag!r} ({nbytes:,} bytes) needs {need:,} bytes of non-pageable "
                f"device memory, more than the budget of {self.budget_bytes:,}: paging moves only "
                "the optimizer state, so this is out of memory even with a paged optimizer")
        self._fixed[tag] = nbytes
        self._make_room(0)
        self.peak_bytes = max(self.peak_bytes, self.used_bytes)

    def free(self, tag: str) -> None:
        """Give back the allocation ``tag`` (pages stay where they are until touched)."""
        if tag not in self._fixed:
            raise UsageError(f"no allocation named {tag!r}; have: {', '.join(self._fixed) or 'none'}")
        del self._fixed[tag]

    # -- pageable (managed) memory ---------------------------------------------------------------
    def new_region(self, nbytes: int) -> int:
        """Register a managed allocation of ``nbytes`` (rounded up to whole pages); returns its id.

        Its pages are not placed anywhere until first touched (as with ``cudaMallocManaged``).
        """
        nbytes = check_int("region size", nbytes, 1)
        rid = self._next_region
        self._next_region += 1
        self._regions[rid] = -(-nbytes // self.page_bytes)
        return rid

    def region_pages(self, region: int) -> int:
        self._check_region(region)
        return self._regions[region]

    def free_region(self, region: int) -> None:
        """Forget a managed allocation and its pages, wherever they are (no transfer)."""
        self._check_region(region)
        for i in range(self._regions.pop(region)):
            self._resident.pop((region, i), None)
            self._on_host.discard((region, i))

    def touch(self, region: int, start: int, stop: int) -> None:
        """The device reads/writes bytes ``[start, stop)`` of ``region``: every page they overlap
        is made resident, in address order (page-in if it is on the host, first touch if new),
        and becomes the most recently used."""
        self._check_region(region)
        size = self._regions[region] * self.page_bytes
        if not (0 <= start < stop <= size):
            raise UsageError(f"byte range [{start}, {stop}) is outside region {region} "
                             f"(0 .. {size})")
        for i in range(start // self.page_bytes, -(-stop // self.page_bytes)):
            key = (region, i)
            if key in self._resident:
                self._resident.move_to_end(key)
                continue
            self._make_room(self.page_bytes)
            if key in self._on_host:
                self._on_host.remove(key)
                self.page_ins += 1
                self.bytes_in += self.page_bytes
            else:
                self.first_touches += 1
            self._resident[key] = None
            self.peak_bytes = max(self.peak_bytes, self.used_bytes)

    def page_out(self, region: int | None = None) -> int:
        """Evict every resident page (of ``region``, or of all regions) to the host: the
        "evict to CPU" hint. Returns the number of pages moved."""
        keys = [k for k in self._resident if region is None or k[0] == region]
        for key in keys:
            self._evict(key)
        return len(keys)

    # -- internals -------------------------------------------------------------------------------
    def _check_region(self, region: int) -> None:
        if region not in self._regions:
            raise UsageError(f"no managed region {region!r}; have: {sorted(self._regions)}")

    def _evict(self, key) -> None:
        del self._resident[key]
        self._on_host.add(key)
        self.page_outs += 1
        self.bytes_out += self.page_bytes

    def _make_room(self, extra: int) -> None:
        """Evict least-recently-used pages until ``extra`` more bytes fit in the budget."""
        while self.used_bytes + extra > self.budget_bytes:
            if not self._resident:
                raise DeviceOutOfMemory(
                    f"{extra:,} bytes of optimizer state must be on the device, but non-pageable "
                    f"memory already takes {self.fixed_bytes:,} of the {self.budget_bytes:,}-byte "
                    "budget (less than one page is left)")
            self._evict(next(iter(self._resident)))


def _aligned(nbytes: int) -> int:
    return -(-int(nbytes) // ALIGN) * ALIGN


class PagedAdamW(AdamW):
    """AdamW whose moments live in pageable (managed) memory; same numbers as :class:`AdamW`.

    A subclass rather than an option on AdamW: paging changes only *where* ``m`` and ``v`` live
    and what happens before each parameter's update, so it overrides AdamW's two placement hooks
    (``_ensure_state``, ``_before_update``) and inherits the update maths untouched; AdamW itself
    stays free of the simulation's bookkeeping.

    Layout: the moments of all parameters that get state in the same step are views into one
    arena from :func:`minilora.backend.managed_zeros`, ``[m_0 | v_0 | m_1 | v_1 | ...]`` (each
    moment 256-byte aligned), rounded up to whole pages; a parameter's ``m`` and ``v`` are
    contiguous, so fetching one parameter's state touches one byte range. Unlike bitsandbytes,
    small tensors are not kept out of the arena: they share pages with their neighbours.

    Args:
        model, lr, betas, eps, weight_decay: as for :class:`AdamW`.
        device: a :class:`DeviceMemory` to simulate paging on (either backend), or None.
        prefetch: on CuPy, ``cudaMemPrefetchAsync`` each parameter's state to the GPU before
            its update (bitsandbytes' ``prefetch_state``). The first failure turns it off and is
            kept in ``prefetch_error``.
    """

    def __init__(self, model, lr=1e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1,
                 device: DeviceMemory | None = None, prefetch: bool = True):
        super().__init__(model, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        if device is not None and not isinstance(device, DeviceMemory):
            raise TypeError(f"device must be a minilora.paged.DeviceMemory or None, "
                            f"got {type(device).__name__}")
        self.device = device
        self.prefetch = bool(prefetch)
        self.prefetch_error: str | None = None
        self.arenas: list = []  # [(uint8 buffer, DeviceMemory region id or None)]
        self._slot: dict = {}  # name -> (arena index, byte offset of m, bytes spanned by m and v)

    @property
    def page_bytes(self) -> int:
        return self.device.page_bytes if self.device is not None else PAGE_BYTES

    def paged_bytes(self) -> int:
        """Bytes of managed memory held (arenas, whole pages; >= :meth:`state_bytes`)."""
        return sum(int(a.nbytes) for a, _ in self.arenas)

    def _ensure_state(self, items) -> None:
        new = [(n, p) for n, p, _ in items if n not in self._slot]
        if not new:
            return
        offsets, off = {}, 0
        for name, p in new:
            offsets[name] = off
            off += 2 * _aligned(p.nbytes)
        total = max(1, -(-off // self.page_bytes)) * self.page_bytes
        arena = backend.managed_zeros(total)
        region = self.device.new_region(total) if self.device is not None else None
        k = len(self.arenas)
        self.arenas.append((arena, region))
        for name, p in new:
            o, nb = offsets[name], int(p.nbytes)
            m = arena[o:o + nb].view(p.dtype).reshape(p.shape)
            v = arena[o + _aligned(nb):o + _aligned(nb) + nb].view(p.dtype).reshape(p.shape)
            if name in self.m:  # state loaded from a checkpoint: move it into the arena
                m[...] = self.m[name]
                v[...] = self.v[name]
            self.m[name], self.v[name] = m, v
            self._slot[name] = (k, o, _aligned(nb) + nb)

    def _before_update(self, name: str) -> None:
        k, off, span = self._slot[name]
        arena, region = self.arenas[k]
        if self.device is not None:
            self.device.touch(region, off, off + span)
        if self.prefetch and self.prefetch_error is None and backend.is_cupy():
            self.prefetch_error = backend.prefetch(arena[off:off + span])

    def page_out(self) -> None:
        """Hint: move all optimizer state to host memory now (e.g. before a known memory spike).

        Simulation: every resident page is paged out (counted). CuPy: a prefetch to the host
        (``cudaCpuDeviceId``). The next update pages it back in either way.
        """
        if self.device is not None:
            self.device.page_out()
        if backend.is_cupy() and self.prefetch_error is None:
            for arena, _ in self.arenas:
                self.prefetch_error = backend.prefetch(arena, to_host=True)

    def load_state(self, arrays: dict, meta: dict) -> None:
        """As :meth:`AdamW.load_state`, then the loaded moments are copied into a new arena."""
        super().load_state(arrays, meta)
        for _, region in self.arenas:
            if region is not None:
                self.device.free_region(region)
        self.arenas, self._slot = [], {}
        self._ensure_state([(n, p, None) for n, p, _ in self.model.named_trainable() if n in self.m])
