"""Many LoRA adapters on one base model: switch them, merge them, and serve a batch that mixes them.

An adapter is a few kilobytes of factors (A, B) per adapted layer; the base is megabytes. So one
base in memory can serve many tasks (LoRA paper §4; S-LoRA, Punica)::

    reg = AdapterRegistry(base)                       # a plain GPT (no LoRA layers yet)
    reg.load("milton", "runs/milton/adapter.safetensors")
    reg.load("python", "runs/python/adapter.safetensors")
    reg.set_adapter("milton")                         # unmerged: point the layers at its A, B
    reg.set_adapter("python", merge=True)             # merged: W0 += ΔW_python (after unmerging)
    reg.disable_adapters()                            # exactly the base again
    logits = reg.forward(idx, adapter_ids=["milton", "python", None, "milton"])   # one batch

Three ways to run an adapter, and what a switch costs:

* **unmerged** (``set_adapter(name)``): each LoRA layer computes ``W0 x + s B (A x)``. A switch
  only re-points ``lora_A`` / ``lora_B`` at the stored arrays of the new adapter: no arithmetic,
  no copy of the base.
* **merged** (``set_adapter(name, merge=True)``): ``W0 <- W0 - ΔW_old + ΔW_new``
  (:func:`minilora.methods.lora.unmerge_lora`, then :func:`minilora.methods.lora.merge_lora` with its finite
  check), so inference runs at the base's cost. In place, as PEFT does: each round trip moves W0
  by about one float32 ulp (measured in ``tests/test_multi_adapter.py``).
* **mixed batch** (``forward(idx, adapter_ids)``): row b uses adapter ``adapter_ids[b]`` (or none).
  The rows are sorted by adapter so that each adapter's rows form one contiguous segment (the
  permutation is undone on the logits; every other op of the GPT treats rows independently).
  Every LoRA layer then computes, for the whole batch and per segment g = [s, e)::

      out          = x @ W0.T + b                                   (B, T, d_out)   one GEMM
      out[s:e]    += s_g * (x[s:e] @ A_g.T) @ B_g.T                 (e - s, T, d_out)

  i.e. S-LoRA / Punica's "segmented gather" (SGMV): the base GEMM is shared, each adapter adds
  two thin GEMMs on its own rows only. The result equals running each row alone with its
  adapter (float64: to rounding). Inference only: the mixed layers have no backward.

Adapters must adapt the same modules (``target_modules``) of the same base; their ranks and
scalings may differ. Adapters that change the base itself are refused: ``bias`` other than
"none" (trained biases belong to the base tensors, shared by every row) and ``"pissa"`` (its base
is the residual W0 - ΔW0, not W0).

Chapter: chapters/04-lora-notes.ipynb
"""
from __future__ import annotations

import numpy as np

from minilora import backend
from minilora.methods.lora.config import LoraConfig
from minilora.errors import UsageError
from minilora.methods.lora import (
    LoRAError,
    LoRALinear,
    inject_lora,
    lora_layers,
    merge_lora,
    read_adapter,
    set_lora_training,
    unmerge_lora,
)
from minilora.methods.lora.mixed import (
    BASE,
    Adapter,
    MixedLoRAEmbedding,
    MixedLoRALinear,
    merge_and_unload,
    plain_layer,
)
from minilora.nn.layers import Embedding, Linear, Module
from minilora.nn.modules_to_save import split_saved_modules
from minilora.sample import generate


class AdapterRegistry:
    """Several named LoRA adapters on one base model, switched or mixed per row.

    Args:
        model: a :class:`minilora.model.GPT` without LoRA layers. The registry injects the LoRA
            wrappers when the first adapter is added and from then on decides which of three
            stand-ins sits in each adapted position of the model tree: the plain base layer
            (no adapter), the LoRA wrapper pointing at the active adapter's arrays, or a mixed
            layer for one :meth:`forward` call.

    Attributes:
        adapters: ``{name: Adapter}`` in the order added (integer adapter ids index this order).
        active: the name of the adapter in use (None: the base).
        merged: whether ``active`` is merged into W0.

    Chapter: chapters/04-lora-notes.ipynb
    """

    def __init__(self, model: Module):
        if lora_layers(model):
            raise LoRAError("AdapterRegistry needs the plain base model: this one already has "
                            "LoRA layers. Load the base checkpoint again, or save the trained "
                            "adapter (save_adapter) and add it with load()")
        self.model = model
        self.adapters: dict[str, Adapter] = {}
        self.active: str | None = None
        self.merged = False
        self._wrappers: dict = {}  # layer name -> LoRALinear / LoRAEmbedding
        self._plain: dict = {}  # layer name -> plain Linear / Embedding on the same arrays
        self._mixed: dict = {}  # layer name -> MixedLoRALinear / MixedLoRAEmbedding
        self._parents: dict = {}  # layer name -> (parent module, child name)

    # -- bookkeeping ---------------------------------------------------------------------------
    @property
    def names(self) -> list:
        return list(self.adapters)

    @property
    def config(self):
        return self.model.config

    @property
    def layer_names(self) -> list:
        """The adapted module names (empty until the first adapter is added)."""
        return list(self._wrappers)

    def _install(self, which: dict) -> None:
        """Put ``which[name]`` into the model tree at every adapted position."""
        for name, (parent, child) in self._parents.items():
            if parent.children[child] is not which[name]:
                parent.replace(child, which[name])

    def _installed(self) -> dict:
        return {n: p.children[c] for n, (p, c) in self._parents.items()}

    def _point(self, adapter: Adapter) -> None:
        """Re-point every wrapper's lora_A / lora_B (and r, scaling) at ``adapter``: no copy."""
        cfg = adapter.config
        for name, m in self._wrappers.items():
            A, B = adapter.factors[name]
            m.params["lora_A"], m.params["lora_B"] = A, B
            m.grads.clear()
            m.r, m.lora_alpha, m.use_rslora, m.scaling = (cfg.r, cfg.lora_alpha, cfg.use_rslora,
                                                          cfg.scaling)

    # -- adding adapters -----------------------------------------------------------------------
    def _check_adapter(self, name, arrays: dict, config: LoraConfig, where: str) -> list:
        """Validate before anything changes; returns the adapted layer names in tree order."""
        if not isinstance(name, str) or not name:
            raise UsageError(f"adapter name must be a non-empty string, got {name!r}")
        if name in self.adapters:
            raise LoRAError(f"an adapter named {name!r} is already registered "
                            f"({', '.join(self.adapters)}); pick another name")
        if not isinstance(config, LoraConfig):
            raise TypeError(f"config must be a LoraConfig, got {type(config).__name__}")
        if config.bias != "none":
            raise LoRAError(f"{where}: bias={config.bias!r} trains biases of the base itself, "
                            "which every adapter and every row share; only bias='none' adapters "
                            "can live side by side on one base")
        if config.init_lora_weights == "pissa":
            raise LoRAError(f"{where}: a 'pissa' adapter belongs to the residual base W0 - ΔW0, "
                            "not to W0; load it alone with load_adapter (or merge it into a "
                            "checkpoint with `minilora adapter merge`)")
        bad = [k for k in arrays if k.rsplit(".", 1)[-1] not in ("lora_A", "lora_B")]
        if bad:
            raise LoRAError(f"{where}: tensors {bad[:4]} are not LoRA factors (lora_A / lora_B)")
        modules = dict(self.model.named_modules())
        want = self.layer_names or [
            n for n, m in modules.items()
            if n and n.rsplit(".", 1)[-1] in config.target_modules
            and isinstance(m, (Linear, Embedding))]
        have = {k.rsplit(".", 1)[0] for k in arrays}
        if have != set(want):
            extra, missing = sorted(have - set(want)), [n for n in want if n not in have]
            raise LoRAError(f"{where}: adapts {sorted(have)[:4]}{' ...' if len(have) > 4 else ''} "
                            f"but this registry's layers are {want[:4]}"
                            f"{' ...' if len(want) > 4 else ''} (not in the registry: {extra[:3]}, "
                            f"missing: {missing[:3]}); adapters on one base must adapt the same "
                            "modules")
        r = config.r
        for n in want:
            m = modules[n]
            w = m.params["weight"]
            if isinstance(m, (Linear, LoRALinear)):
                d_out, d_in = w.shape
                shapes = {"lora_A": (r, d_in), "lora_B": (d_out, r)}
            else:
                V, C = w.shape
                shapes = {"lora_A": (r, V), "lora_B": (C, r)}
            for k, shape in shapes.items():
                got = tuple(arrays[f"{n}.{k}"].shape)
                if got != shape:
                    raise LoRAError(f"{where}: tensor {n}.{k} has shape {got} but a rank-{r} "
                                    f"adapter of this base needs {shape}: the adapter was built "
                                    "for a base model of another shape (n_embd / vocab_size)")
        for k, a in arrays.items():
            if not np.isfinite(backend.to_numpy(a)).all():
                raise LoRAError(f"{where}: tensor {k!r} holds NaN or inf")
        return want

    def add(self, name: str, arrays: dict, config: LoraConfig, source=None) -> Adapter:
        """Register an adapter from its tensors (``{"blocks.0.attn.q.lora_A": A, ...}``, as
        :func:`minilora.methods.lora.lora_state_dict` names them) and its :class:`LoraConfig`.

        Every check (names, target modules, shapes for this base, finite values) runs before the
        registry or the model changes. The active adapter and mode are not changed.
        """
        where = f"adapter {name!r}" + (f" ({source})" if source else "")
        layer_names = self._check_adapter(name, arrays, config, where)
        if not self._wrappers:
            inject_lora(self.model, config)
            set_lora_training(self.model, False)
            modules = dict(self.model.named_modules())
            for n in layer_names:
                parent, _, child = n.rpartition(".")
                wrapper = modules[n]
                self._wrappers[n] = wrapper
                self._parents[n] = (modules[parent], child)
                self._plain[n] = plain_layer(wrapper)
                self._mixed[n] = (MixedLoRALinear(wrapper) if isinstance(wrapper, LoRALinear)
                                  else MixedLoRAEmbedding(wrapper))
            self._install(self._plain)  # nothing active yet: the model stays the base
        dtype = self.model.dtype
        factors = {n: tuple(backend.asarray(backend.to_numpy(arrays[f"{n}.{k}"]), dtype=dtype)
                            for k in ("lora_A", "lora_B")) for n in layer_names}
        adapter = Adapter(name, config, factors, None if source is None else str(source))
        self.adapters[name] = adapter
        return adapter

    def load(self, name: str, path) -> Adapter:
        """Register the adapter file ``path`` (from :func:`minilora.methods.lora.save_adapter`)."""
        arrays, config = read_adapter(path, self.model)
        _, _, saved = split_saved_modules(arrays)
        if saved:
            raise LoRAError(f"adapter file {str(path)!r} also trains whole modules "
                            f"(modules_to_save: {', '.join(saved)}); the registry swaps LoRA "
                            "factors only, so load that adapter on its own with load_adapter")
        return self.add(name, arrays, config, source=path)

    def remove(self, name: str) -> None:
        """Forget an adapter (not the active one)."""
        self._get(name)
        if name == self.active:
            raise LoRAError(f"adapter {name!r} is active; disable_adapters() or set another first")
        del self.adapters[name]

    def _get(self, name) -> Adapter:
        if name not in self.adapters:
            raise LoRAError(f"no adapter named {name!r}; registered: "
                            f"{', '.join(self.adapters) or '(none)'}")
        return self.adapters[name]

    # -- switching -------------------------------------------------------------------------------
    def set_adapter(self, name: str, merge: bool = False) -> None:
        """Make ``name`` the active adapter, unmerged (pointer switch) or merged into W0.

        Unmerged: the wrappers' lora_A / lora_B now point at ``name``'s arrays (no arithmetic, no
        copy). Merged: the old adapter is unmerged first (W0 -= ΔW_old), then W0 += ΔW_new with
        :func:`minilora.methods.lora.merge_lora`'s finite check; if that check fails, nothing was written
        and ``name`` stays active unmerged (the error says so).
        """
        adapter = self._get(name)
        if self.merged:
            unmerge_lora(self.model)
            self.merged = False
        self._point(adapter)
        self._install(self._wrappers)
        self.active = name
        if merge:
            try:
                merge_lora(self.model, safe_merge=True)
            except LoRAError as e:
                raise LoRAError(f"{e}; adapter {name!r} is active unmerged") from None
            self.merged = True

    def disable_adapters(self) -> None:
        """Run the plain base: unmerge if merged, then put the plain layers back in the tree.

        From the unmerged mode this is exactly the base (the same W0 arrays, untouched); after a
        merge it is the base up to the rounding of the merge/unmerge round trip.
        """
        if self.merged:
            unmerge_lora(self.model)
            self.merged = False
        if self._plain:
            self._install(self._plain)
        self.active = None

    # -- mixed batches ---------------------------------------------------------------------------
    def adapter_index(self, adapter_ids, batch_size: int):
        """Row adapter ids -> a CPU integer array (B,), -1 for the base.

        ``adapter_ids``: a sequence of names / integer indices into :attr:`names` / None (base),
        or an integer array; its length must be the batch size.
        """
        names = self.names
        if backend.is_array(adapter_ids) or isinstance(adapter_ids, np.ndarray):
            ids = backend.to_numpy(adapter_ids)
            if ids.ndim != 1 or ids.dtype.kind not in "iu":
                raise UsageError(f"adapter_ids must be a 1-D integer array, got shape "
                                 f"{ids.shape}, dtype {ids.dtype}")
            ids = ids.astype(np.int64)
        else:
            out = []
            for a in adapter_ids:
                if a is None or (isinstance(a, int) and not isinstance(a, bool) and a == -1):
                    out.append(-1)
                elif isinstance(a, str):
                    self._get(a)
                    out.append(names.index(a))
                elif isinstance(a, int) and not isinstance(a, bool):
                    out.append(a)
                else:
                    raise UsageError(f"adapter id {a!r} must be a name, an index or None (base)")
            ids = np.asarray(out, dtype=np.int64)
        if len(ids) != batch_size:
            raise UsageError(f"got {len(ids)} adapter ids for a batch of {batch_size} rows; give "
                             "one per row (None or -1 for the base)")
        bad = ids[(ids < -1) | (ids >= len(names))]
        if bad.size:
            raise UsageError(f"adapter index {int(bad[0])} out of range: {len(names)} adapters "
                             f"registered ({', '.join(names) or 'none'}); -1 is the base")
        return ids

    def forward(self, idx, adapter_ids=None, check: bool = True, kv=None):
        """Logits (B, T, V) for ``idx`` (B, T); row b uses adapter ``adapter_ids[b]``.

        Without ``adapter_ids``: the model as it is now (active adapter or base). With them: the
        mixed-batch path described in the module docstring; it needs the unmerged base (W0 must
        not hold another adapter's ΔW) and leaves the registry's mode as it was.

        ``kv``: a generation's KV cache (``model.kv_cache(B)``); ``idx`` are then its new tokens
        (``model.forward_incremental``). The cache keeps the rows grouped by adapter: use it with
        the same ids on every call (:class:`MixedBatchModel` does).
        """
        def run(x, check=False):
            if kv is None:
                return self.model.forward(x, check=check)[0]
            return self.model.forward_incremental(x, kv, check=check)

        if adapter_ids is None:
            return run(idx, check)
        if self.merged:
            raise LoRAError(f"a mixed-adapter batch needs the unmerged base, but {self.active!r} "
                            "is merged into W0; call disable_adapters() or "
                            "set_adapter(name) (unmerged) first")
        if check:
            self.model.check_input(idx)
            if kv is not None:
                kv.check_chunk(idx)
        ids = self.adapter_index(adapter_ids, idx.shape[0])
        if not self._wrappers or (ids == -1).all():
            if self.active is None:
                return run(idx)
            saved = self._installed()
            self._install(self._plain)
            try:
                return run(idx)
            finally:
                self._install(saved)
        order = np.argsort(ids, kind="stable")  # rows grouped by adapter, base rows first
        sorted_ids = ids[order]
        permuted = bool((order != np.arange(len(ids))).any())
        bounds = np.flatnonzero(np.diff(sorted_ids)) + 1
        starts = np.concatenate([[0], bounds])
        ends = np.concatenate([bounds, [len(ids)]])
        adapters = list(self.adapters.values())
        segments = [(int(s), int(e), adapters[int(sorted_ids[s])])
                    for s, e in zip(starts, ends) if sorted_ids[s] >= 0]
        for n, mixed in self._mixed.items():
            mixed.segments = [(s, e, *a.factors[n], a.config.scaling) for s, e, a in segments]
        saved = self._installed()
        self._install(self._mixed)
        try:
            x = idx[backend.asarray(order)] if permuted else idx
            logits = run(x)
        finally:
            self._install(saved)
            for mixed in self._mixed.values():
                mixed.segments = []
        if permuted:
            logits = logits[backend.asarray(np.argsort(order))]
        return logits

    def view(self, adapter_ids) -> "MixedBatchModel":
        """A model-like object whose forward uses these row adapter ids (for generation)."""
        return MixedBatchModel(self, adapter_ids)


class MixedBatchModel:
    """Looks like a GPT for inference (``config``, ``forward(idx, check)``, ``kv_cache(B)``,
    ``forward_incremental(idx, kv)``); every row b runs adapter ``adapter_ids[b]``. Lets
    :func:`minilora.sample.generate` (with its KV cache) and :func:`minilora.train.evaluate`
    serve several adapters in one batch."""

    def __init__(self, registry: AdapterRegistry, adapter_ids):
        self.registry = registry
        self.adapter_ids = list(adapter_ids)

    @property
    def config(self):
        return self.registry.model.config

    def forward(self, idx, check: bool = True):
        return self.registry.forward(idx, self.adapter_ids, check=check), None

    def kv_cache(self, batch_size: int, keep: int | None = None):
        """A generation cache for this batch (its rows are kept grouped by adapter)."""
        return self.registry.model.kv_cache(batch_size, keep)

    def forward_incremental(self, idx, kv, check: bool = True):
        """Logits (B, T, V) of the new tokens ``idx``, each row with its own adapter, through
        the mixed layers (the base GEMM shared, each adapter's thin GEMMs on its rows)."""
        return self.registry.forward(idx, self.adapter_ids, check=check, kv=kv)


# ----------------------------------------------------------------------------------------------
# generation and scoring with several adapters in one batch
# ----------------------------------------------------------------------------------------------
def generate_mixed(registry: AdapterRegistry, tokenizer, prompt: str, adapters: list,
                   max_new_tokens: int = 200, temperature: float = 0.8, top_k=None,
                   seed: int = 0, *, use_cache: bool = True, exact_window: bool = False,
                   keep=None, progress=None) -> list:
    """Continue ``prompt`` once per entry of ``adapters`` (names or None for the base), all rows
    in one batch (one KV cache for the batch, unless ``use_cache=False``); returns the texts
    (prompt + continuation) in the same order. ``exact_window``, ``keep``: as for
    :func:`minilora.sample.generate`."""

    if not prompt:
        raise UsageError("prompt must contain at least one character (try '\\n')")
    ids = tokenizer.encode(prompt)
    idx = backend.asarray(np.repeat(ids[None, :].astype("int64"), len(adapters), axis=0))
    out = generate(registry.view(adapters), idx, max_new_tokens, temperature, top_k, rng=seed,
                   use_cache=use_cache, exact_window=exact_window, keep=keep, progress=progress)
    return [tokenizer.decode(row) for row in backend.to_numpy(out)]


__all__ = ["BASE", "Adapter", "AdapterRegistry", "MixedBatchModel", "MixedLoRAEmbedding",
           "MixedLoRALinear", "generate_mixed", "merge_and_unload", "plain_layer"]
