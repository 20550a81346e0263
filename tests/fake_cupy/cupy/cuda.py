"""``cupy.cuda`` in the strict stand-in: one pretend device, streams, memory pools, managed memory.

Managed (unified) allocations are ordinary host buffers whose address ranges are remembered, so
``runtime.pointerGetAttributes`` can report them as managed (type 3) and
``runtime.memPrefetchAsync`` can refuse a pointer that is not managed (CUDA answers
cudaErrorInvalidValue there). Prefetch calls are recorded in ``runtime.PREFETCHES``.
"""
from __future__ import annotations

import weakref
from typing import ClassVar

import numpy as _np

SYNCS = [0]              # device -> host syncs (float(x), .get(), .item(), ...)
_MANAGED: dict[int, int] = {}   # start address -> size of live managed allocations


def _sync():
    SYNCS[0] += 1


class CUDARuntimeError(RuntimeError):
    pass


class Device:
    """The current device (always device 0 here)."""

    def __init__(self, device=None):
        self.id = 0 if device is None else int(device)
        if self.id != 0:
            raise CUDARuntimeError("cudaErrorInvalidDevice: invalid device ordinal")

    def synchronize(self):
        _sync()

    def use(self):
        return None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __eq__(self, other):
        return isinstance(other, Device) and other.id == self.id

    def __hash__(self):
        return hash(self.id)

    def __repr__(self):
        return f"<CUDA Device {self.id} (strict stand-in)>"

    @property
    def mem_info(self):
        return (8 << 30, 16 << 30)


class Stream:
    """A stream: ``ptr`` (0 = the legacy default stream), context manager, synchronize."""

    _next: ClassVar[list] = [1]
    null = None  # set below

    def __init__(self, null=False, non_blocking=False, ptds=False):
        if null:
            self.ptr = 0
        else:
            self.ptr = Stream._next[0]
            Stream._next[0] += 1

    def synchronize(self):
        _sync()

    def use(self):
        _current[0] = self
        return self

    def __enter__(self):
        self._prev = _current[0]
        _current[0] = self
        return self

    def __exit__(self, *exc):
        _current[0] = self._prev
        return False


Stream.null = Stream(null=True)
_current = [Stream.null]


def get_current_stream():
    return _current[0]


class _Memory:
    def __init__(self, size: int):
        self.size = int(size)
        self.buffer = _np.zeros(max(self.size, 1), dtype=_np.uint8)
        self.ptr = self.buffer.__array_interface__["data"][0]
        self.device_id = 0


class ManagedMemory(_Memory):
    """``cudaMallocManaged`` memory: one address valid on host and device."""

    def __init__(self, size: int):
        super().__init__(size)
        _MANAGED[self.ptr] = self.size
        # forgotten when the buffer dies (arrays made on it keep the buffer, not this object)
        weakref.finalize(self.buffer, _MANAGED.pop, self.ptr, None)


class MemoryPointer:
    def __init__(self, mem, offset: int = 0):
        self.mem, self.offset = mem, int(offset)

    @property
    def ptr(self) -> int:
        return self.mem.ptr + self.offset

    @property
    def device_id(self) -> int:
        return 0

    def __add__(self, n):
        return MemoryPointer(self.mem, self.offset + int(n))

    def __int__(self):
        return self.ptr


def malloc_managed(size: int) -> MemoryPointer:
    return MemoryPointer(ManagedMemory(size), 0)


def alloc(size: int) -> MemoryPointer:
    return MemoryPointer(_Memory(size), 0)


class MemoryPool:
    """A pool over ``allocator`` (default: plain device memory), as ``cupy.cuda.MemoryPool``."""

    def __init__(self, allocator=None):
        self._allocator = allocator or alloc
        self._used = 0

    def malloc(self, size: int) -> MemoryPointer:
        size = int(size)
        self._used += size
        return self._allocator(size)

    def used_bytes(self) -> int:
        return self._used

    def total_bytes(self) -> int:
        return self._used

    def free_all_blocks(self, stream=None):
        return None


class PinnedMemoryPool(MemoryPool):
    pass


_allocator = [MemoryPool().malloc]


def set_allocator(allocator=None):
    _allocator[0] = allocator or MemoryPool().malloc


def get_allocator():
    return _allocator[0]


class runtime:
    """``cupy.cuda.runtime``: the calls minilora uses."""

    CUDARuntimeError = CUDARuntimeError
    memoryTypeHost, memoryTypeDevice, memoryTypeManaged = 1, 2, 3
    cudaCpuDeviceId = -1
    PREFETCHES: ClassVar[list] = []  # (ptr, nbytes, device, stream_ptr) of every accepted prefetch

    @staticmethod
    def getDeviceCount() -> int:
        return 1

    @staticmethod
    def getDevice() -> int:
        return 0

    @staticmethod
    def deviceSynchronize():
        _sync()

    @staticmethod
    def _managed_range(ptr: int, nbytes: int = 1) -> bool:
        return any(start <= ptr and ptr + nbytes <= start + size
                   for start, size in _MANAGED.items())

    @staticmethod
    def pointerGetAttributes(ptr: int):
        class _Attributes:
            pass
        attrs = _Attributes()
        attrs.device = 0
        attrs.devicePointer = attrs.hostPointer = int(ptr)
        attrs.type = 3 if runtime._managed_range(int(ptr)) else 2
        return attrs

    @staticmethod
    def memPrefetchAsync(ptr: int, count: int, dst_device: int, stream: int):
        if dst_device not in (-1, 0):
            raise CUDARuntimeError("cudaErrorInvalidDevice: invalid device ordinal")
        if not runtime._managed_range(int(ptr), int(count)):
            raise CUDARuntimeError("cudaErrorInvalidValue: invalid argument (prefetch of memory "
                                   "that is not managed)")
        runtime.PREFETCHES.append((int(ptr), int(count), int(dst_device), int(stream)))
