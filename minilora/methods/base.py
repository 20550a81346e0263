"""What every fine-tuning method is: one small interface, the same for all of them.

A method (LoRA, DoRA, AdaLoRA, QLoRA, (IA)³, Houlsby, prefix, prompt, BitFit, full fine-tuning)
lives in one module of :mod:`minilora.methods` (LoRA in a folder): its config dataclass (defaults,
validation, one help line per field), its layers (forward and hand-written backward side by side,
gradchecked), and one :class:`Method` object, listed once in the registry
(:data:`minilora.methods.METHODS`)::

    method = get_method("lora")
    tuned = method.apply(base_gpt, method.default_config())   # what trains, with what config
    ...train tuned.model (tuned.callbacks run after each backward / optimizer step)...
    method.save("lora.safetensors", tuned)                    # our typed file
    tuned2 = method.load("lora.safetensors", fresh_base_gpt)
    method.export_peft("runs/peft", tuned)                    # Hugging Face PEFT's directory
    tuned3 = method.import_peft("runs/peft", fresh_base_gpt)  # (where PEFT has the method)
    method.merge(tuned)                                       # (where the method can merge)

Every consumer (the fine-tuning harness, ``minilora finetune`` and its flags, ``adapter
export-peft / import-peft / merge``, the results table, the bench, the chapters) asks the registry,
so adding a method is its module plus one line there.

Chapter: chapters/04-lora-notes.ipynb (the PEFT taxonomy)
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

from minilora import backend
from minilora.backend import xp
from minilora.errors import MiniloraError, PeftError, UsageError
from minilora.io import check_same_base, config_from_meta, read_typed, write_typed
from minilora.model import GPT, LanguageModelMixin
from minilora.nn.layers import Linear, Module
from minilora.nn.modules_to_save import (
    add_modules_to_save,
    check_saved_modules,
    load_saved_modules,
    saved_modules_tensors,
    split_saved_modules,
)


class Tuned(NamedTuple):
    """A base model with a method applied.

    Attributes:
        model: what trains and runs: the base GPT itself, changed in place (LoRA, Houlsby, ...),
            or a wrapper around it (prefix and prompt tuning).
        config: the method's config.
        method: the :class:`Method` (its name: ``tuned.method.name``).
        modules_to_save: module paths trained whole beside the method (PEFT's option).
        callbacks: training callbacks (:class:`minilora.train.Callback`): AdaLoRA's rank
            allocator; empty for the others.
        report: what applying measured (trainable counts; QLoRA: the base's digests, ...).
        params: the names of the method's own parameters (what it trains and saves, the modules
            saved whole apart); empty: the trainable ones outside the saved modules.
    """
    model: object
    config: object
    method: "Method"
    modules_to_save: tuple = ()
    callbacks: tuple = ()
    report: dict | None = None
    params: tuple = ()

    @property
    def gpt(self):
        """The base GPT inside ``model``."""
        return base_gpt(self.model)


def base_gpt(model):
    """The GPT a method's model is built on (the model itself, or what a wrapper wraps)."""
    while not isinstance(model, GPT) and getattr(model, "gpt", None) is not None:
        model = model.gpt
    return model


class Method:
    """One fine-tuning method (override what the method has; the rest refuses in one line).

    Attributes:
        name: its name on the command line and in ``result.json`` (``minilora finetune --method``).
        config_cls: its config dataclass (None: no options, full fine-tuning).
        summary: one line for ``--help``.
        weights_file: the file (or folder) a run directory keeps the trained weights in.
        file_format: the :mod:`minilora.io` format id of that file (None: not a typed file).
        peft_type: Hugging Face PEFT's ``peft_type`` where PEFT has the method (None: it has not).
        lr: the harness's default (peak, final) learning rates for this method.
    """

    name = ""
    example = ""            # flags for its line in ``minilora finetune --help``
    config_cls = None
    summary = ""
    weights_file = ""
    file_format = None
    peft_type = None
    lr = (5e-3, 5e-4)
    #: how the harness measures the base when the method changes the step-0 outputs: None (it
    #: does not), "wrapped" (the GPT the method wraps), "copy" (a copy kept before apply: QLoRA)
    base_differs = None
    #: whether a killed run continues from its checkpoint (``finetune --resume``), and why not
    resumable = True
    resumable_why = ""

    # -- configs -------------------------------------------------------------------------------
    def default_config(self, steps=None):
        """The config this method trains with when none is given (the harness's default);
        ``steps``: the run's length, for a config that depends on it (AdaLoRA's schedule)."""
        return None if self.config_cls is None else self.config_cls()

    def check_config(self, config):
        """``config`` as an instance of :attr:`config_cls`: None gives :meth:`default_config`, a
        dict is parsed (unknown fields refused); anything else is one clear error."""
        if config is None:
            return self.default_config()
        if self.config_cls is None:
            raise UsageError(f"method {self.name!r} takes no method config (every parameter "
                             f"trains), got {type(config).__name__}")
        if isinstance(config, dict):
            config = self.config_cls.from_dict(config)
        if not isinstance(config, self.config_cls):
            raise UsageError(f"method {self.name!r} needs a {self.config_cls.__name__}, got "
                             f"{type(config).__name__}")
        return config

    def config_fields(self) -> list:
        """The config's fields (:func:`dataclasses.fields`), for generated flags and help."""
        return [] if self.config_cls is None else list(dataclasses.fields(self.config_cls))

    # -- the interface ---------------------------------------------------------------------------
    def apply(self, model, config=None, modules_to_save=()) -> Tuned:
        """Apply the method to a freshly loaded base GPT (in place, or wrapped); freeze what it
        does not train; ``modules_to_save``: module paths trained whole beside it."""
        config = self.check_config(config)
        tuned = self._apply(model, config)
        tuned = tuned._replace(params=tuple(n for n, _, _ in tuned.model.named_trainable()))
        if modules_to_save:
            saved = add_modules_to_save(tuned.model, modules_to_save)
            tuned = tuned._replace(modules_to_save=tuple(saved.paths))
        return tuned

    def _apply(self, model, config) -> Tuned:
        raise NotImplementedError

    def trainable(self, tuned: Tuned) -> dict:
        """The method's own tensors by parameter name (the arrays themselves; the modules saved
        whole are not the method's)."""
        if tuned.params:
            own = set(tuned.params)
            return {n: p for n, p in tuned.model.named_parameters() if n in own}
        saved = tuple(p + "." for p in tuned.modules_to_save)
        return {n: p for n, p, _ in tuned.model.named_trainable() if not n.startswith(saved)}

    def save(self, path, tuned: Tuned) -> None:
        """Write what the method trained (and the modules saved whole) to ``path``, atomically."""
        raise PeftError(f"method {self.name!r} has no file of its own")

    def load(self, path, model) -> Tuned:
        """Apply a file from :meth:`save` to a fresh base GPT."""
        raise PeftError(f"method {self.name!r} has no file of its own")

    def export_peft(self, path_dir, tuned: Tuned, base_model_name_or_path=None):
        """Write Hugging Face PEFT's adapter directory (only where PEFT has the method)."""
        raise PeftError(f"Hugging Face PEFT has no {self.name} method, so its adapters do not "
                        "export to PEFT's format (the methods with a peft_type do)")

    def import_peft(self, path_dir, model) -> Tuned:
        """Read Hugging Face PEFT's adapter directory into a fresh base GPT."""
        raise PeftError(f"Hugging Face PEFT has no {self.name} method to import")

    def merge(self, tuned: Tuned):
        """Fold the trained update into the base weights and put plain layers back (PEFT's
        ``merge_and_unload``); returns the plain GPT (only where the method can merge)."""
        raise PeftError(f"method {self.name!r} cannot be merged into the base weights (its "
                        "update is not a change of W0); use the adapter file as it is")

    @property
    def can_merge(self) -> bool:
        """Whether the method's update folds into the base weights (it overrides merge)."""
        return type(self).merge is not Method.merge

    def record(self, tuned: Tuned) -> dict | None:
        """What ``result.json`` records of the method's options (its config; a method may add
        what it learned in the run: AdaLoRA's final ranks)."""
        return None if tuned.config is None else tuned.config.to_dict()

    def extra_files(self, tuned: Tuned) -> dict:
        """Files (name -> text) a run directory keeps beside the weights (AdaLoRA's ranks)."""
        return {}

    def __repr__(self) -> str:
        return f"<method {self.name}>"


# ----------------------------------------------------------------------------------------------
# one typed file for the methods that save a set of tensors by parameter name
# ----------------------------------------------------------------------------------------------
#: the format id of that file (Houlsby, prefix, prompt, BitFit; the header names the method). A
#: historical id, kept so that every file ever written loads: these methods once lived in a
#: package named "peft", a name now kept for Hugging Face's format alone
METHOD_FILE_FORMAT = "minilora-peft-v1"


def save_tensors_file(path, fmt: str, tuned: Tuned, arrays: dict, meta: dict) -> None:
    """Write ``arrays`` (the method's tensors by parameter name) and the modules saved whole
    (``<path>.modules_to_save.default.<tensor>``) with ``meta`` + the base model's config and the
    saved module list in the JSON header (:func:`minilora.io.write_typed`, atomic)."""
    if not arrays:
        raise PeftError(f"{tuned.method.name}: the model holds none of the method's parameters; "
                        "apply the method first")
    meta = {**meta, "model_config": tuned.gpt.config.to_dict(),
            "modules_to_save": list(tuned.modules_to_save)}
    write_typed(path, fmt, {**arrays, **saved_modules_tensors(tuned.model, tuned.modules_to_save)},
                meta)


def read_tensors_file(path, fmt: str, what: str, model, config_key: str, config_cls,
                      allow_nonfinite: bool = False):
    """Read a :func:`save_tensors_file` file for a fresh base GPT ``model``: ``(config, the
    method's arrays, the saved modules' arrays, their paths)``, the base's shape checked."""
    arrays, meta = read_typed(path, fmt, what, allow_nonfinite)
    config = config_from_meta(path, meta, config_key, config_cls, what)
    check_same_base(path, meta.get("model_config"), base_gpt(model).config, error=PeftError)
    arrays, saved, paths = split_saved_modules(arrays)
    return config, arrays, saved, paths


def copy_in(model, arrays: dict, wanted: dict, where: str, saved=None, paths=()) -> None:
    """Copy ``arrays`` into the model's parameters ``wanted`` (name -> array): every name and
    shape checked, and the saved modules' too, before anything is written."""
    unexpected = sorted(set(arrays) - set(wanted))
    missing = sorted(set(wanted) - set(arrays))
    if unexpected or missing:
        raise PeftError(f"{where} does not match this model's parameters of the method: missing "
                        f"{missing[:4]}, unexpected {unexpected[:4]}")
    for n, a in arrays.items():
        if tuple(a.shape) != tuple(wanted[n].shape):
            raise PeftError(f"{where}: tensor {n!r} has shape {tuple(a.shape)}, the model's is "
                            f"{tuple(wanted[n].shape)}")
    check_saved_modules(model, paths, saved or {}, where)
    for n, a in arrays.items():
        wanted[n][...] = backend.asarray(backend.to_numpy(a), dtype=wanted[n].dtype)
    if paths:
        load_saved_modules(model, paths, saved, where)


class GPTWrapper(LanguageModelMixin, Module):
    """A GPT plus extra inputs (prefix and prompt tuning). Shares the GPT's children (same
    objects, same names) and adds one child of its own, so ``named_parameters()`` = the GPT's
    names + the new ones.

    Subclasses implement ``forward(idx, check)`` -> (logits (B, T, V), cache) and
    ``backward(dlogits, cache)``; ``forward_backward`` / ``loss`` / ``config`` / ``dtype`` follow
    the GPT's contract so the training harness cannot tell the difference.
    """

    extra_name = "?"

    def __init__(self, gpt, extra: Module):
        super().__init__()
        check_gpt(gpt, type(self).__name__)
        self.gpt = gpt
        self.children = dict(gpt.children)  # the same module objects: one set of weights
        self.add(self.extra_name, extra)
        self.config = gpt.config

    @property
    def dtype(self):
        return self.gpt.dtype

    def check_input(self, idx) -> None:
        self.gpt.check_input(idx)

    def forward_incremental(self, idx, kv, check: bool = True):
        """Generation: the GPT's, on a cache from this wrapper's ``kv_cache`` (whose fixed
        slots hold the prefix / the soft prompt's keys)."""
        return self.gpt.forward_incremental(idx, kv, check=check)


def random_token_ids(gpt, n: int, rng):
    """(1, n) token ids drawn uniformly from ``gpt``'s vocabulary (the "vocab" inits)."""
    return backend.asarray(rng.integers(0, gpt.config.vocab_size, size=(1, n)))


def layer_keys_values(gpt, x):
    """The keys and values every attention layer of ``gpt`` computes for the inputs ``x``
    (1, P, C) (embeddings, positions included): (key, value), each (n_layer, P, C)."""
    keys, values = [], []
    for blk in gpt.blocks:
        a = blk.ln_1.forward(x)[0]
        keys.append(blk.attn.k.forward(a)[0][0])  # (P, C)
        values.append(blk.attn.v.forward(a)[0][0])
        x = blk.forward(x)[0]
    return xp.stack(keys), xp.stack(values)


def target_linears(modules: dict, target_modules, error=PeftError) -> list[str]:
    """The names in ``modules`` (``dict(model.named_modules())``) of every
    :class:`~minilora.nn.layers.Linear` whose last path component is in ``target_modules``, in
    model order; ``error`` (one line) when none is."""
    targets = [n for n, m in modules.items()
               if n and n.rsplit(".", 1)[-1] in target_modules and isinstance(m, Linear)]
    if not targets:
        raise error(f"no Linear of the model matches target_modules {list(target_modules)}")
    return targets


def unwrap_linears(model, layers: dict):
    """Put a plain :class:`~minilora.nn.layers.Linear` holding each wrapper's (merged) ``weight``
    and ``bias`` in place of every layer in ``layers`` (``{name: wrapper}``); returns ``model``."""
    modules = dict(model.named_modules())
    for name, m in layers.items():
        parent, _, child = name.rpartition(".")
        modules[parent].replace(child, Linear(m.params["weight"], m.params.get("bias")))
    return model


def truncated_normal(rng, shape, std):
    """N(0, std^2) redrawn until inside +-2 std (TensorFlow's truncated_normal), CPU float64."""
    a = rng.standard_normal(shape)
    bad = abs(a) > 2.0
    while bad.any():
        a[bad] = rng.standard_normal(int(bad.sum()))
        bad = abs(a) > 2.0
    return a * std


def check_gpt(gpt, what: str) -> None:
    """One clear error unless ``gpt`` is a minilora GPT."""
    if not isinstance(gpt, GPT):
        raise TypeError(f"{what} wraps a minilora GPT, got {type(gpt).__name__}")


__all__ = ["unwrap_linears", "METHOD_FILE_FORMAT", "GPTWrapper", "layer_keys_values", "random_token_ids", "Method", "Tuned", "base_gpt", "check_gpt", "copy_in",
           "read_tensors_file", "save_tensors_file", "truncated_normal"]
