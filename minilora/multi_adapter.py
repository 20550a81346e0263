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
  (:func:`minilora.lora.unmerge_lora`, then :func:`minilora.lora.merge_lora` with its finite
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

Chapter: chapters/02-lora-notes.ipynb
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import NamedTuple

from minilora import backend
from minilora.backend import xp
from minilora.config import LoraConfig
from minilora.lora import (LoRAEmbedding, LoRAError, LoRALinear, inject_lora, lora_layers,
                           merge_lora, read_adapter, set_lora_training, unmerge_lora)
from minilora.nn import ops
from minilora.nn.layers import Embedding, Linear, Module

BASE = None  # the adapter id of a row that runs the plain base model (also -1 as an integer)


class Adapter(NamedTuple):
    """One registered adapter: its config and factors ``{layer name: (A, B)}`` on the backend."""
    name: str
    config: LoraConfig
    factors: dict
    source: str | None

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) + int(b.nbytes) for a, b in self.factors.values())


# ----------------------------------------------------------------------------------------------
# plain and mixed stand-ins for a LoRA layer (put into the model tree in its place)
# ----------------------------------------------------------------------------------------------
def plain_layer(wrapper) -> Module:
    """The base layer of a LoRA wrapper: a frozen Linear / Embedding on the *same* arrays.

    Installed in the wrapper's place it gives exactly the base model (no adapter path at all).
    """
    if isinstance(wrapper, LoRALinear):
        layer = Linear(wrapper.params["weight"], wrapper.params.get("bias"))
    elif isinstance(wrapper, LoRAEmbedding):
        layer = Embedding(wrapper.params["weight"])
    else:
        raise TypeError(f"plain_layer takes a LoRALinear or LoRAEmbedding, got "
                        f"{type(wrapper).__name__}")
    layer.trainable = set()
    return layer


class MixedLoRALinear(Module):
    """A Linear whose rows use different adapters (inference only).

    out = x @ W0.T + b;  out[s:e] += s_g (x[s:e] @ A_g.T) @ B_g.T   for each segment (s, e, A_g, B_g, s_g)

    ``segments`` is set by :meth:`AdapterRegistry.forward` for one call; rows in no segment get
    the base output. x (B, T, d_in) -> out (B, T, d_out).
    """

    def __init__(self, wrapper: LoRALinear):
        super().__init__()
        self.wrapper = wrapper
        self.segments = []

    def forward(self, x):
        p = self.wrapper.params
        out, _ = ops.linear_forward(x, p["weight"], p.get("bias"))  # (B, T, d_out)
        for s, e, A, B, scaling in self.segments:
            h, _ = ops.linear_forward(x[s:e], A)  # (e - s, T, r): a contiguous view of x
            u, _ = ops.linear_forward(h, B)  # (e - s, T, d_out)
            u *= scaling
            out[s:e] += u
        return out, None

    def backward(self, dout, cache, need_dx: bool = True):
        raise LoRAError("mixed-adapter batches are for inference only (no backward); train one "
                        "adapter at a time with set_adapter(name)")


class MixedLoRAEmbedding(Module):
    """An Embedding whose rows use different adapters (inference only).

    out = W0[idx];  out[s:e] += s_g A_g.T[idx[s:e]] @ B_g.T   for each segment; idx (B, T) -> (B, T, C)
    """

    def __init__(self, wrapper: LoRAEmbedding):
        super().__init__()
        self.wrapper = wrapper
        self.segments = []

    def forward(self, idx):
        out, _ = ops.embedding_forward(idx, self.wrapper.params["weight"])  # (B, T, C)
        if self.segments:
            out = out.copy()  # W0[idx] may be a view of W0 on some backends: never add into it
        for s, e, A, B, scaling in self.segments:
            h, _ = ops.embedding_forward(idx[s:e], A.T)  # rows of A.T: (e - s, T, r)
            u, _ = ops.linear_forward(h, B)  # (e - s, T, C)
            u *= scaling
            out[s:e] += u
        return out, None

    def backward(self, dout, cache):
        raise LoRAError("mixed-adapter batches are for inference only (no backward)")


def merge_and_unload(model: Module) -> Module:
    """Merge every LoRA layer (finite-checked) and put plain base layers in their place.

    Afterwards ``model`` is an ordinary GPT again whose weights hold W0 + ΔW: its
    ``named_parameters()`` have no ``lora_`` tensors, so :func:`minilora.checkpoint.save_checkpoint`
    writes a full checkpoint that loads without minilora's LoRA code (PEFT's ``merge_and_unload``).
    """
    layers = lora_layers(model)
    if not layers:
        raise LoRAError("merge_and_unload: the model has no LoRA layers")
    if not all(m.merged for m in layers.values()):
        merge_lora(model, safe_merge=True)
    modules = dict(model.named_modules())
    for name, m in layers.items():
        parent, _, child = name.rpartition(".")
        modules[parent].replace(child, plain_layer(m))
    return model


# ----------------------------------------------------------------------------------------------
# the registry
# ----------------------------------------------------------------------------------------------
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

    Chapter: chapters/02-lora-notes.ipynb
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
            raise ValueError(f"adapter name must be a non-empty string, got {name!r}")
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
        np_ = backend.cpu_module()
        for k, a in arrays.items():
            if not np_.isfinite(backend.to_numpy(a)).all():
                raise LoRAError(f"{where}: tensor {k!r} holds NaN or inf")
        return want

    def add(self, name: str, arrays: dict, config: LoraConfig, source=None) -> Adapter:
        """Register an adapter from its tensors (``{"blocks.0.attn.q.lora_A": A, ...}``, as
        :func:`minilora.lora.lora_state_dict` names them) and its :class:`LoraConfig`.

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
        """Register the adapter file ``path`` (from :func:`minilora.lora.save_adapter`)."""
        arrays, config = read_adapter(path, self.model)
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
        :func:`minilora.lora.merge_lora`'s finite check; if that check fails, nothing was written
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
        np_ = backend.cpu_module()
        names = self.names
        if backend.is_array(adapter_ids) or isinstance(adapter_ids, np_.ndarray):
            ids = backend.to_numpy(adapter_ids)
            if ids.ndim != 1 or ids.dtype.kind not in "iu":
                raise ValueError(f"adapter_ids must be a 1-D integer array, got shape "
                                 f"{ids.shape}, dtype {ids.dtype}")
            ids = ids.astype(np_.int64)
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
                    raise ValueError(f"adapter id {a!r} must be a name, an index or None (base)")
            ids = np_.asarray(out, dtype=np_.int64)
        if len(ids) != batch_size:
            raise ValueError(f"got {len(ids)} adapter ids for a batch of {batch_size} rows; give "
                             "one per row (None or -1 for the base)")
        bad = ids[(ids < -1) | (ids >= len(names))]
        if bad.size:
            raise ValueError(f"adapter index {int(bad[0])} out of range: {len(names)} adapters "
                             f"registered ({', '.join(names) or 'none'}); -1 is the base")
        return ids

    def forward(self, idx, adapter_ids=None, check: bool = True):
        """Logits (B, T, V) for ``idx`` (B, T); row b uses adapter ``adapter_ids[b]``.

        Without ``adapter_ids``: the model as it is now (active adapter or base). With them: the
        mixed-batch path described in the module docstring; it needs the unmerged base (W0 must
        not hold another adapter's ΔW) and leaves the registry's mode as it was.
        """
        if adapter_ids is None:
            return self.model.forward(idx, check=check)[0]
        if self.merged:
            raise LoRAError(f"a mixed-adapter batch needs the unmerged base, but {self.active!r} "
                            "is merged into W0; call disable_adapters() or "
                            "set_adapter(name) (unmerged) first")
        if check:
            self.model.check_input(idx)
        np_ = backend.cpu_module()
        ids = self.adapter_index(adapter_ids, idx.shape[0])
        if not self._wrappers or (ids == -1).all():
            if self.active is None:
                return self.model.forward(idx, check=False)[0]
            saved = self._installed()
            self._install(self._plain)
            try:
                return self.model.forward(idx, check=False)[0]
            finally:
                self._install(saved)
        order = np_.argsort(ids, kind="stable")  # rows grouped by adapter, base rows first
        sorted_ids = ids[order]
        permuted = bool((order != np_.arange(len(ids))).any())
        bounds = np_.flatnonzero(np_.diff(sorted_ids)) + 1
        starts = np_.concatenate([[0], bounds])
        ends = np_.concatenate([bounds, [len(ids)]])
        adapters = list(self.adapters.values())
        segments = [(int(s), int(e), adapters[int(sorted_ids[s])])
                    for s, e in zip(starts, ends) if sorted_ids[s] >= 0]
        for n, mixed in self._mixed.items():
            mixed.segments = [(s, e, *a.factors[n], a.config.scaling) for s, e, a in segments]
        saved = self._installed()
        self._install(self._mixed)
        try:
            x = idx[backend.asarray(order)] if permuted else idx
            logits, _ = self.model.forward(x, check=False)
        finally:
            self._install(saved)
            for mixed in self._mixed.values():
                mixed.segments = []
        if permuted:
            logits = logits[backend.asarray(np_.argsort(order))]
        return logits

    def view(self, adapter_ids) -> "MixedBatchModel":
        """A model-like object whose forward uses these row adapter ids (for generation)."""
        return MixedBatchModel(self, adapter_ids)


class MixedBatchModel:
    """Looks like a GPT for inference (``config``, ``forward(idx, check)``); every row b of a
    forward call runs adapter ``adapter_ids[b]``. Lets :func:`minilora.sample.generate` and
    :func:`minilora.train.evaluate` serve several adapters in one batch."""

    def __init__(self, registry: AdapterRegistry, adapter_ids):
        self.registry = registry
        self.adapter_ids = list(adapter_ids)

    @property
    def config(self):
        return self.registry.model.config

    def forward(self, idx, check: bool = True):
        return self.registry.forward(idx, self.adapter_ids, check=check), None


# ----------------------------------------------------------------------------------------------
# generation and scoring with several adapters in one batch
# ----------------------------------------------------------------------------------------------
def generate_mixed(registry: AdapterRegistry, tokenizer, prompt: str, adapters: list,
                   max_new_tokens: int = 200, temperature: float = 0.8, top_k=None,
                   seed: int = 0) -> list:
    """Continue ``prompt`` once per entry of ``adapters`` (names or None for the base), all rows
    in one batch; returns the texts (prompt + continuation) in the same order."""
    from minilora.sample import generate

    if not prompt:
        raise ValueError("prompt must contain at least one character (try '\\n')")
    ids = tokenizer.encode(prompt)
    np_ = backend.cpu_module()
    idx = backend.asarray(np_.repeat(ids[None, :].astype("int64"), len(adapters), axis=0))
    out = generate(registry.view(adapters), idx, max_new_tokens, temperature, top_k, rng=seed)
    return [tokenizer.decode(row) for row in backend.to_numpy(out)]


def score_adapters(registry: AdapterRegistry, tokenizer, task: str, adapters: list,
                   eval_batches: int = 16, batch_size: int = 8, block_size: int = 128,
                   eval_examples: int | None = None) -> dict:
    """Score every adapter of ``adapters`` (names, or None for the base) on ``task``, in mixed
    batches: each evaluation batch is repeated once per adapter and run as one batch.

    The windows and test rows are the ones :func:`minilora.finetune.finetune` scores (fixed
    batches, seed 12345), so the numbers are comparable with its ``task_metric``.

    Returns:
        ``{"metric": str, "higher_is_better": bool, "scores": {label: value}, "rows": int,
        "seconds": float}`` with label = the adapter name or "base".
    """
    from minilora.data import encode_classification, encode_corpus
    from minilora.finetune import LM_TASKS, TASKS, classification_splits, task_splits
    from minilora.train import fixed_batches

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; allowed: {', '.join(TASKS)}")
    if not adapters:
        raise ValueError("give at least one adapter (or None for the base) to score")
    labels = ["base" if a is None else a for a in adapters]
    if len(set(labels)) != len(labels):
        raise ValueError(f"adapters to score must be distinct, got {labels}")
    for a in adapters:
        if a is not None:
            registry._get(a)
    n = len(adapters)
    np_ = backend.cpu_module()
    t0 = time.perf_counter()
    if task in LM_TASKS:
        test_ids = encode_corpus(task_splits(task)[1], tokenizer)
        totals = [0.0] * n
        batches = fixed_batches(test_ids, eval_batches, batch_size, block_size, seed=12345)
        for x, y in batches:
            B = x.shape[0]
            X = backend.asarray(np_.concatenate([x] * n).astype("int64"))  # (n B, T)
            logits = registry.forward(X, [a for a in adapters for _ in range(B)], check=False)
            yb = backend.asarray(y)
            for i in range(n):
                loss, _ = ops.cross_entropy_forward(logits[i * B:(i + 1) * B], yb)
                totals[i] += backend.to_scalar(loss)
        scores = {lab: t / len(batches) for lab, t in zip(labels, totals)}
        rows, metric, higher = len(batches) * batch_size * n, "test loss (nats/char)", False
    else:
        X, Y = encode_classification(classification_splits(task)["test"][:eval_examples],
                                     tokenizer, block_size)
        label_ids = Y[:, -1]
        candidates = np_.unique(label_ids)
        correct = [0] * n
        chunk = max(1, 128 // n)
        for s in range(0, len(X), chunk):
            x = X[s:s + chunk]
            B = len(x)
            logits = registry.forward(backend.asarray(np_.concatenate([x] * n).astype("int64")),
                                      [a for a in adapters for _ in range(B)], check=False)
            last = backend.to_numpy(logits[:, -1, :])[:, candidates]  # (n B, labels)
            pred = candidates[last.argmax(axis=1)]
            for i in range(n):
                correct[i] += int((pred[i * B:(i + 1) * B] == label_ids[s:s + B]).sum())
        scores = {lab: c / len(X) for lab, c in zip(labels, correct)}
        rows, metric, higher = len(X) * n, "test accuracy", True
    return {"metric": metric, "higher_is_better": higher, "scores": scores, "rows": rows,
            "seconds": time.perf_counter() - t0}


def format_scores(task: str, result: dict) -> str:
    """A small table of :func:`score_adapters`' result, best first."""
    scores = result["scores"]
    order = sorted(scores, key=scores.get, reverse=result["higher_is_better"])
    w = max(len(k) for k in scores)
    lines = [f"{task}: {result['metric']} ({'higher' if result['higher_is_better'] else 'lower'} "
             f"is better); {result['rows']} rows in mixed batches, {result['seconds']:.1f} s"]
    lines += [f"  {k:<{w}}  {scores[k]:.4f}" for k in order]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# the articles' claim: per-task adapters hot-swapped vs one general adapter on mixed data
# ----------------------------------------------------------------------------------------------
CLAIM_COMMAND = "minilora adapter claim --out results/multi_adapter"


def _task_batch_fn(task: str, tokenizer, batch_size: int, block_size: int):
    """``f(rng) -> (x, y)`` drawing one training batch of ``task`` (finetune's training data)."""
    from minilora.data import encode_classification, encode_corpus, get_batch, sample_rows
    from minilora.finetune import LM_TASKS, classification_splits, task_splits

    if task in LM_TASKS:
        ids = encode_corpus(task_splits(task)[0], tokenizer)
        return lambda rng: get_batch(ids, batch_size, block_size, rng)
    X, Y = encode_classification(classification_splits(task)["train"], tokenizer, block_size)
    return lambda rng: sample_rows(X, Y, batch_size, rng)


def train_general_adapter(tasks, lora_config: LoraConfig, max_steps: int, out_dir,
                          base_path=None, progress: bool = False) -> dict:
    """Train one LoRA on all ``tasks``: step k trains on task ``k mod len(tasks)`` (round robin,
    so each task gets exactly ``max_steps / len(tasks)`` batches, as in its own per-task run).

    The harness's LoRA setup and training config (:func:`minilora.finetune.default_train_config`:
    batch 8 x 128, warmup, cosine, LoRA's learning rate) with ``max_steps``. Each batch is one
    task's: a batch mixing tasks row by row would let the language-modelling rows, scored at
    every position, drown the single scored position of a classification row.
    Writes ``out_dir/adapter.safetensors``; returns ``{"train_seconds", "final_loss",
    "train_config"}``.
    """
    from minilora.checkpoint import base_model_path, load_checkpoint
    from minilora.finetune import default_train_config, method_setup
    from minilora.train import train

    model, tok, _ = load_checkpoint(base_path or base_model_path())
    setup = method_setup("lora")(model, tok, lora_config)
    tcfg = default_train_config(setup, max_steps=max_steps)
    fns = [_task_batch_fn(t, tok, tcfg.batch_size, tcfg.block_size) for t in tasks]
    step = [0]

    def batch_fn(rng):  # round robin; this run is never resumed, so the counter is safe
        fn = fns[step[0] % len(fns)]
        step[0] += 1
        return fn(rng)

    hist = train(setup.model, tok, None, None, tcfg, out_dir=None, progress=progress,
                 batch_fn=batch_fn)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    setup.save(out)
    return {"train_seconds": hist.seconds, "final_loss": hist.train[-1]["loss"],
            "train_config": tcfg.to_dict()}


def run_claim(out_dir="results/multi_adapter", tasks=("milton", "python"), steps: int = 200,
              r: int = 8, lora_alpha: float = 16, targets=("q", "v"), eval_batches: int = 16,
              eval_examples: int | None = None, runs_dir="runs/multi_adapter",
              progress: bool = False, log=print) -> dict:
    """Per-task LoRAs, hot-swapped, vs one general LoRA trained on the mixed tasks.

    * per task: :func:`minilora.finetune.finetune` ("lora", ``steps`` steps, rank ``r``);
    * general: the same LoRA config and schedule for ``steps * len(tasks)`` steps, round robin
      over the tasks (:func:`train_general_adapter`): the same total steps and data per task;
    * scoring: every task's test set with the base, its own adapter and the general one, all in
      one mixed-adapter batch per window (:func:`score_adapters`).

    Writes ``out_dir/claim.json`` (atomically) and the adapters under ``runs_dir``.
    """
    from minilora.checkpoint import atomic_write_text, base_model_path, load_checkpoint
    from minilora.finetune import TASKS, finetune

    tasks = tuple(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; allowed: {', '.join(TASKS)}")
    if len(tasks) < 2 or len(set(tasks)) != len(tasks):
        raise ValueError(f"the claim compares per-task adapters with a general one: give at "
                         f"least two distinct tasks, got {list(tasks)}")
    cfg = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=tuple(targets))
    runs = Path(runs_dir)
    per_task = {}
    for t in tasks:
        log(f"[claim] per-task LoRA on {t}: {steps} steps")
        res = finetune("lora", t, cfg, {"max_steps": steps}, out_dir=runs / t, progress=progress,
                       eval_batches=eval_batches, eval_examples=eval_examples)
        per_task[t] = {"train_seconds": res["train_seconds"], "task_metric": res["task_metric"],
                       "train_config": res["train_config"]}
    general_steps = steps * len(tasks)
    log(f"[claim] general LoRA on {'+'.join(tasks)}: {general_steps} steps, round robin")
    general = train_general_adapter(tasks, cfg, general_steps, runs / "general",
                                    progress=progress)

    base, tok, _ = load_checkpoint(base_model_path())
    reg = AdapterRegistry(base)
    for t in tasks:
        reg.load(t, runs / t / "adapter.safetensors")
    reg.load("general", runs / "general" / "adapter.safetensors")
    tc = per_task[tasks[0]]["train_config"]
    results = {}
    for t in tasks:
        log(f"[claim] scoring {t}: base, {t}, general in one mixed batch per window")
        s = score_adapters(reg, tok, t, [None, t, "general"], eval_batches,
                           tc["batch_size"], tc["block_size"], eval_examples)
        sc = s["scores"]
        better = sc[t] > sc["general"] if s["higher_is_better"] else sc[t] < sc["general"]
        results[t] = {"metric": s["metric"], "higher_is_better": s["higher_is_better"],
                      "base": sc["base"], "per_task": sc[t], "general": sc["general"],
                      "per_task_better": bool(better), "score_seconds": s["seconds"]}
        log(format_scores(t, s))
    holds = all(v["per_task_better"] for v in results.values())
    command = CLAIM_COMMAND
    if (tasks, steps) != (("milton", "python"), 200):
        command += f" --tasks {','.join(tasks)} --steps {steps}"
    record = {
        "claim": "one general LoRA on mixed tasks underperforms per-task LoRAs that are hot-swapped",
        "holds_here": holds, "command": command,
        "tasks": list(tasks), "lora_config": cfg.to_dict(),
        "steps_per_task": steps, "general_steps": general_steps,
        "train_config_per_task": tc, "train_config_general": general["train_config"],
        "train_seconds": {**{t: v["train_seconds"] for t, v in per_task.items()},
                          "general": general["train_seconds"]},
        "eval_batches": eval_batches, "eval_examples": eval_examples,
        "adapter_bytes": {n: a.nbytes for n, a in reg.adapters.items()},
        "results": results,
    }
    out = Path(out_dir)
    atomic_write_text(out / "claim.json", json.dumps(record, indent=2) + "\n")
    log(f"[claim] {'holds' if holds else 'does NOT hold'} here; written {out / 'claim.json'}")
    return record


def fig_claim(results: Path, figures: Path) -> list:
    """Bar chart of ``results/multi_adapter/claim.json``: base / general / per-task per task."""
    from minilora.plots import pyplot, read_json, save_figure

    rec = read_json(Path(results) / "multi_adapter" / "claim.json", CLAIM_COMMAND)
    plt = pyplot()
    tasks = rec["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 3.4), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        v = rec["results"][t]
        names, vals = ["base", "general", f"{t}\n(own)"], [v["base"], v["general"], v["per_task"]]
        bars = ax.bar(names, vals, color=["#999999", "#d08c3c", "#3c78d0"])
        for b, val in zip(bars, vals):
            ax.annotate(f"{val:.3f}", (b.get_x() + b.get_width() / 2, val), ha="center",
                        va="bottom", fontsize=8)
        lo = min(vals)
        if not v["higher_is_better"]:
            ax.set_ylim(lo * 0.9, max(vals) * 1.03)
        ax.set_title(t)
        ax.set_ylabel(v["metric"] + (" ↑" if v["higher_is_better"] else " ↓"))
    fig.suptitle(f"Per-task LoRA (hot-swapped) vs one general LoRA, r={rec['lora_config']['r']}, "
                 f"{rec['steps_per_task']} steps/task: claim "
                 f"{'holds' if rec['holds_here'] else 'does not hold'}", fontsize=9)
    fig.tight_layout()
    return [save_figure(fig, Path(figures) / "multi_adapter_claim.png")]


__all__ = ["AdapterRegistry", "Adapter", "MixedBatchModel", "MixedLoRALinear",
           "MixedLoRAEmbedding", "plain_layer", "merge_and_unload", "generate_mixed",
           "score_adapters", "format_scores", "train_general_adapter", "run_claim", "fig_claim"]
