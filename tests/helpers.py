"""Small helpers shared by the test files (imported as ``from helpers import ...``: pytest puts
``tests/`` on sys.path)."""
import numpy as np

from minilora import backend


def randn(rng, *shape, scale=1.0, dtype="float64"):
    """A standard-normal backend array of ``shape`` times ``scale``, drawn from ``rng``."""
    return backend.asarray(rng.standard_normal(shape) * scale, dtype=dtype)


def batch(seed=0, B=2, T=6, V=11):
    """One (inputs, targets) pair of random token ids, (B, T) each, from its own seed."""
    rng = np.random.default_rng(seed)
    return (backend.asarray(rng.integers(0, V, size=(B, T))),
            backend.asarray(rng.integers(0, V, size=(B, T))))


def np_(a):
    """A backend array as NumPy (for assertions)."""
    return backend.to_numpy(a)


def lora_layer_gradcheck(layer, x, dout, mask_seed=7):
    """Finite-difference rows (``gradcheck.check``) for ``dx`` and every trainable parameter of a
    LoRA-style layer, with the same dropout mask in every forward pass of the check."""
    from minilora.backend import xp
    from minilora.gradcheck import check

    def f():
        layer.dropout_rng = backend.cpu_rng(mask_seed)
        return xp.sum(layer.forward(x)[0] * dout)

    layer.dropout_rng = backend.cpu_rng(mask_seed)
    out, cache = layer.forward(x)
    layer.zero_grad()
    dx = layer.backward(dout, cache)
    return [check("dx", dx, f, x)] + [check(f"d{name}", layer.grads[name], f, layer.params[name])
                                      for name in sorted(layer.trainable)]


def save_arrays(path, arrays, meta):
    """Write a typed file whatever its meta says (tests use it to forge odd or broken files)."""
    from minilora.io import write_typed
    write_typed(path, meta.get("format", "test-file"), arrays, meta)


def load_arrays(path):
    """(arrays, meta) of any minilora file, without a format check."""
    from minilora.io import read_typed
    return read_typed(path, None)


# -- the methods through the registry's one interface, by config (for tests written per config) ---
def method_for(config):
    """The registered method whose config class is exactly ``type(config)`` (one error else)."""
    from minilora.methods.registry import METHODS
    hits = [m for m in METHODS.values() if m.config_cls is type(config)
            and getattr(m, "use_dora", False) == getattr(config, "use_dora", False)]
    if len(hits) != 1:
        raise TypeError(f"config must be one of the methods' configs; got "
                        f"{type(config).__name__}")
    return hits[0]


def apply_method(model, config):
    """The model to train after applying ``config``'s method (``method.apply(...).model``)."""
    return method_for(config).apply(model, config).model


def count_method_parameters(config, model_config):
    return method_for(config).count_parameters(config, model_config)


def method_tensors(model, config):
    from minilora.methods.base import Tuned
    m = method_for(config)
    return m.trainable(Tuned(model, config, m))


def save_method(path, model, config, modules_to_save=()):
    from minilora.methods.base import Tuned
    m = method_for(config)
    m.save(path, Tuned(model, config, m, tuple(modules_to_save)))


def load_method(path, model):
    """``(model, config)`` of a method file (the registry finds its method from the header)."""
    from minilora.methods.registry import method_of_file
    tuned = method_of_file(path).load(path, model)
    return tuned.model, tuned.config


#: each method's small fields for a tiny GPT (C = 16, 2 layers); full fine-tuning and BitFit
#: have none (their default config, or None)
SMALL_METHOD_FIELDS = {
    "lora": dict(r=2, lora_alpha=4, target_modules=("q", "v")),
    "dora": dict(r=2, lora_alpha=4, target_modules=("q", "v")),
    "qlora": dict(r=2, lora_alpha=4, target_modules=("q", "v"), blocksize=16),
    "adalora": dict(init_r=3, target_r=2, lora_alpha=6, target_modules=("q", "v", "o"),
                    tinit=0, tfinal=1, deltaT=1, total_step=3),
    "houlsby": dict(bottleneck=4), "prefix": dict(prefix_len=2), "prompt": dict(prompt_len=2)}


def small_method_config(name, **fields):
    """A small config of the registered method ``name`` (3 steps), with ``fields`` on top; None
    for a method without small fields."""
    import dataclasses

    from minilora.methods.registry import METHODS

    small = SMALL_METHOD_FIELDS.get(name)
    if small is None:
        return None
    return dataclasses.replace(METHODS[name].default_config(steps=3), **small, **fields)

