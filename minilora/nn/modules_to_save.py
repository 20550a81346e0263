"""``modules_to_save``: whole named modules that train (and are saved) beside any PEFT method.

A low-rank or bias-only method cannot move what it does not touch: on a labelled task the row of
``lm_head`` that scores the label character is fixed, so QLoRA on q, v, Houlsby adapters, prefix,
prompt and BitFit stay at the majority class. Hugging Face PEFT's answer is ``modules_to_save``:
named modules (typically the output head, ``lm_head``, or a final norm, ``ln_f``) are trained in
full alongside the adapter and stored in the adapter file. ::

    saved = add_modules_to_save(model, ("lm_head",))   # after the method froze the rest
    ...train...                                        # lm_head.weight trains in full
    arrays = modules_to_save_state_dict(model, saved.paths)   # into the adapter file
    saved.restore()                                    # the untouched base modules again

Here the named module trains *in place* (its own arrays get gradients), and the original arrays
are kept as copies, so ``restore()`` gives the base back. PEFT instead wraps the module
(``ModulesToSaveWrapper``: the original plus a trainable copy ``modules_to_save.default``); its
forward uses the copy while the adapter is active, and ``merge_and_unload`` keeps the copy. Both
give the same outputs with the adapter on and after merging; the copy is only needed to switch
the adapter off, which ``restore()`` does here.

File layout: the saved modules travel *inside* the method's own file (the LoRA, DoRA, QLoRA,
(IA)³, Houlsby, prefix, prompt or BitFit file), under PEFT's name for the trained copy,
``lm_head.modules_to_save.default.weight``, with the module list in the header; each loader puts
them back after applying the method. In PEFT's own directory format peft 0.21.2 saves a module's
tensors under the module's path (``base_model.model.lm_head.weight``) and recognises them from
``modules_to_save`` in the config; older PEFT releases wrote
``base_model.model.lm_head.modules_to_save.default.weight``. :mod:`minilora.methods.lora.peft_io`
(and the AdaLoRA export) writes the first and reads both.

Cost: a saved module trains all of its numbers (``lm_head``: V C = 97 x 160 = 15,520 in the
shipped model) and its AdamW moments (2 more copies).

Chapter: chapters/04-lora-notes.ipynb (the PEFT taxonomy)
"""
from __future__ import annotations

from minilora import backend
from minilora.errors import PeftError
from minilora.nn.layers import Module
from minilora.peft_format import MTS_INFIX  # PEFT's name for the trained copy of a module


def _module_paths(model: Module) -> dict:
    return {n: m for n, m in model.named_modules() if n and m.params}


def resolve_modules_to_save(model: Module, names) -> list:
    """The module paths ``names`` select: a name matches a module whose path equals it or ends in
    ``"." + name`` (``ln_1`` selects every block's ``ln_1``). One clear error for a name that
    matches no module with parameters, or for a module that a PEFT method already wraps (a LoRA
    target, an (IA)³ layer: train the adapter *or* the whole module, not both).

    Chapter: chapters/04-lora-notes.ipynb
    """
    if isinstance(names, str):
        names = tuple(n for n in names.split(",") if n)
    if not isinstance(names, (tuple, list)) or not all(isinstance(n, str) and n for n in names):
        raise PeftError(f"modules_to_save must be a list of module names, got {names!r}")
    modules = _module_paths(model)
    paths = []
    for name in names:
        hits = [p for p in modules if p == name or p.endswith("." + name)]
        if not hits:
            leaves = sorted({p.rsplit(".", 1)[-1] for p in modules})
            raise PeftError(f"modules_to_save: no module of the model is named {name!r}; "
                            f"modules with parameters: {', '.join(leaves)}")
        for p in hits:
            wrapped = sorted(k for k in modules[p].params if k not in ("weight", "bias"))
            if wrapped:
                raise PeftError(f"modules_to_save: {p!r} is already adapted by the method (it "
                                f"holds {wrapped}); a module is either adapted or saved whole")
            if p not in paths:
                paths.append(p)
    return paths


class SavedModules:
    """Handle returned by :func:`add_modules_to_save`: the module paths, their parameter names,
    and copies of the original arrays for :meth:`restore`."""

    def __init__(self, model: Module, paths: list):
        self.model = model
        self.paths = list(paths)
        modules = dict(model.named_modules())
        self.param_names = [f"{p}.{k}" for p in self.paths for k in modules[p].params]
        self.originals = {f"{p}.{k}": a.copy() for p in self.paths
                          for k, a in modules[p].params.items()}

    def restore(self) -> None:
        """Put the base arrays back into the saved modules (PEFT's adapter switched off)."""
        modules = dict(self.model.named_modules())
        for name, a in self.originals.items():
            path, _, k = name.rpartition(".")
            modules[path].params[k][...] = a


def add_modules_to_save(model: Module, names) -> SavedModules:
    """Make every parameter of the modules ``names`` select trainable (see
    :func:`resolve_modules_to_save`), keeping whatever the method already trains; returns a
    :class:`SavedModules`. Call it after the method has set its trainable set (inject_lora,
    apply_peft, ...), which freezes everything else.

    Chapter: chapters/04-lora-notes.ipynb
    """
    paths = resolve_modules_to_save(model, names)
    saved = SavedModules(model, paths)
    for path, m in _module_paths(model).items():
        if path in paths:
            m.trainable |= set(m.params)
    return saved


def modules_to_save_state_dict(model: Module, paths) -> dict:
    """``{parameter name: array}`` of the modules at ``paths`` (the arrays themselves).

    Chapter: chapters/04-lora-notes.ipynb
    """
    modules = dict(model.named_modules())
    missing = [p for p in paths if p not in modules]
    if missing:
        raise PeftError(f"modules_to_save: the model has no module {missing[0]!r}")
    return {f"{p}.{k}": a for p in paths for k, a in modules[p].params.items()}


def count_modules_to_save(model: Module, names) -> int:
    """Numbers that the modules ``names`` add to the trainable count (all of their parameters).

    Chapter: chapters/04-lora-notes.ipynb
    """
    modules = dict(model.named_modules())
    return sum(int(a.size) for p in resolve_modules_to_save(model, names)
               for a in modules[p].params.values())


def saved_modules_tensors(model: Module, paths) -> dict:
    """The saved modules' tensors under the keys they take in an adapter file:
    ``<module path>.modules_to_save.default.<parameter>`` (``lm_head.modules_to_save.default.weight``),
    PEFT's name for the trained copy of a module. Every method's file writer
    (:func:`minilora.methods.lora.save_adapter`, ``save_qlora_adapter``, ``save_peft``, ``save_ia3``) adds
    them with ``modules_to_save=paths``.

    Chapter: chapters/04-lora-notes.ipynb
    """
    modules_to_save_state_dict(model, paths)    # one clear error for a path the model lacks
    modules = dict(model.named_modules())
    return {f"{p}{MTS_INFIX}.{k}": a for p in paths for k, a in modules[p].params.items()}


def split_saved_modules(arrays: dict) -> tuple[dict, dict, list]:
    """Split an adapter file's tensors into ``(the method's, the saved modules', module paths)``;
    the saved modules' keys lose their ``.modules_to_save.default`` infix
    (``lm_head.weight``), ready for :func:`load_saved_modules`.

    Chapter: chapters/04-lora-notes.ipynb
    """
    rest, saved, paths = {}, {}, []
    for key, a in arrays.items():
        path, infix, tensor = key.partition(MTS_INFIX + ".")
        if not infix:
            rest[key] = a
            continue
        saved[f"{path}.{tensor}"] = a
        if path not in paths:
            paths.append(path)
    return rest, saved, paths


def check_saved_modules(model: Module, paths, arrays: dict, where: str,
                        error=PeftError) -> dict:
    """Check saved modules' tensors against ``model`` (every name present, every shape equal)
    without writing anything; returns the model's arrays they will be copied into. Loaders call
    it before they write the method's own tensors.

    Chapter: chapters/04-lora-notes.ipynb
    """
    modules = _module_paths(model)
    missing = [p for p in paths if p not in modules]
    if missing:
        raise error(f"{where}: saves the whole module {missing[0]!r} (modules_to_save), which "
                    "this model does not have (another architecture?)")
    wanted = modules_to_save_state_dict(model, paths)
    if set(arrays) != set(wanted):
        raise error(f"{where}: modules_to_save tensors {sorted(arrays)[:4]} do not match this "
                    f"model's modules {list(paths)}: {sorted(wanted)[:4]}")
    for n, a in arrays.items():
        if tuple(a.shape) != tuple(wanted[n].shape):
            raise error(f"{where}: modules_to_save tensor {n!r} has shape {tuple(a.shape)}, this "
                        f"model's is {tuple(wanted[n].shape)} (another base shape?)")
    return wanted


def load_saved_modules(model: Module, paths, arrays: dict, where: str,
                       error=PeftError) -> SavedModules:
    """Copy saved modules' tensors (``{"lm_head.weight": array}``) into ``model`` and mark those
    modules trainable; returns the :class:`SavedModules`, whose ``restore()`` gives the model's
    previous arrays back. Names and shapes are checked before anything is written (``error``:
    the exception class, one message naming ``where``). Call it after the method is applied.

    Chapter: chapters/04-lora-notes.ipynb
    """
    wanted = check_saved_modules(model, paths, arrays, where, error)
    saved = add_modules_to_save(model, paths)   # keeps copies of the base arrays first
    for n, a in arrays.items():
        wanted[n][...] = backend.asarray(backend.to_numpy(a), dtype=wanted[n].dtype)
    return saved


__all__ = ["SavedModules", "add_modules_to_save", "check_saved_modules",
           "count_modules_to_save",
           "load_saved_modules",
           "modules_to_save_state_dict", "resolve_modules_to_save", "saved_modules_tensors",
           "split_saved_modules"]
