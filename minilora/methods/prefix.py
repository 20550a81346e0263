"""Prefix tuning (Li & Liang 2021): P trainable keys and values at every attention layer.

    prefix tuning   per layer, P trainable keys and values prepended to the attention's keys
                    and values: 2 L P C numbers

The GPT already accepts earlier keys and values (``past_kv``, each layer's a
:class:`~minilora.nn.layers.PastKV`: here a :class:`PrefixKV`, which receives its own gradient).
A thin wrapper (:class:`PrefixTuningModel`) holds the prefix in one child (``prefix``) and
*shares* the GPT's children, so every base parameter keeps its name (``blocks.0.attn.q.weight``),
``forward_backward(x, y)`` and ``AdamW(model)`` work unchanged, and the logits cover exactly the T
real tokens.

Chapter: chapters/04-lora-notes.ipynb (the PEFT taxonomy)
"""
from __future__ import annotations

from dataclasses import dataclass

from minilora import backend
from minilora.backend import xp
from minilora.config import ConfigError, JsonConfig, check_float, check_int, option
from minilora.errors import PeftError
from minilora.methods.base import (
    METHOD_FILE_FORMAT,
    Method,
    Tuned,
    copy_in,
    read_tensors_file,
    save_tensors_file,
    GPTWrapper,
    check_gpt,
    layer_keys_values,
    random_token_ids,
)
from minilora.nn.kv_cache import KVCache
from minilora.nn.layers import Module, PastKV

PREFIX_INITS = ("vocab", "random")


@dataclass(frozen=True)
class PrefixConfig(JsonConfig):
    """Prefix tuning (Li & Liang 2021): P trainable keys and values at every attention layer.

    Parameterised directly: ``prefix.key`` and ``prefix.value``, each (n_layer, P, C), i.e. a
    (P, C) key block and value block per layer, prepended (after the k / v projections, so they
    span every head) to the keys and values every query sees. The paper's reparameterisation
    P = MLP(P') (an embedding (P, C) through a Tanh MLP of hidden width 512 to 2 L C) is **not**
    implemented: it only changes the optimisation (the paper: direct updates are "unstable"),
    and after training only P itself is kept, which has the same shape as here.

    Attributes:
        prefix_len: P >= 1. The prefix needs no positions, so P is not limited by block_size;
            it costs P extra keys per query (attention over P + T keys).
        init: ``"vocab"`` (default): the keys and values the frozen base computes for P token
            ids drawn uniformly from the vocabulary (Li & Liang: initialising with "activations
            of real words" helps); ``"random"``: N(0, init_std^2).
        init_std: std for ``init="random"``.
        seed: seeds the CPU generator (token draw or normal draw).
    """

    prefix_len: int = option(16, "keys and values per layer P", range=(1, None))
    init: str = option("vocab", "the base's keys and values of random tokens, or random",
                       choices=PREFIX_INITS)
    init_std: float = option(1.0, "std for --init random", range=(0, None, True, False))
    seed: int = option(0, "seed of the initialisation", cli=False)

    def __post_init__(self):
        check_int("prefix_len", self.prefix_len)
        if self.init not in PREFIX_INITS:
            raise ConfigError(f"prefix init must be one of {list(PREFIX_INITS)}; got {self.init!r}")
        check_float("init_std", self.init_std, lo=0.0, lo_open=True)
        check_int("seed", self.seed, lo=0)


class PrefixKV(PastKV):
    """One layer's prefix for one forward pass: P keys and values (P, C) in front of the
    layer's own, the same for every row (a :class:`~minilora.nn.layers.PastKV`).

    extend:    K = [broadcast(key, B); k]           (B, P + T, C), likewise V
    backward:  dkey = sum over b of dK[b, :P]       (P, C), kept in ``dkey`` / ``dvalue``
    """

    def __init__(self, key, value):
        self.key, self.value = key, value
        self.dkey = self.dvalue = None

    def extend(self, k, v):
        B, (P, C) = k.shape[0], self.key.shape
        return (xp.concatenate([xp.broadcast_to(self.key, (B, P, C)), k], axis=1),
                xp.concatenate([xp.broadcast_to(self.value, (B, P, C)), v], axis=1))

    def backward(self, dk, dv) -> None:
        self.dkey, self.dvalue = dk.sum(axis=0), dv.sum(axis=0)


class PrefixTuningModel(GPTWrapper):
    """A frozen GPT whose every attention layer also attends to P trainable keys and values.

    For layer l:  K_l = [prefix.key[l]; x W_k^T + b_k]   V_l = [prefix.value[l]; x W_v^T + b_v]
    (each (B, P + T, C), the prefix broadcast over the batch), so every query attends to the P
    prefix slots plus the causal past. Parameters: ``prefix.key``, ``prefix.value`` (L, P, C).
    Gradients: each layer's :class:`PrefixKV` receives dK[:, :P], dV[:, :P] from its attention
    and sums them over the batch. Generation: :meth:`kv_cache` puts the prefix in the cache's
    first P (fixed) slots, so a decoding step attends over [prefix; cached tokens; new token].

    No prefix leaves the model exactly unchanged: the prefix slots always take some of the
    softmax mass, so unlike a zero-initialised LoRA or adapter the logits differ from the base's
    at step 0 (the ``"vocab"`` init makes them the base's own keys/values of real tokens).

    Chapter: chapters/04-lora-notes.ipynb
    """

    extra_name = "prefix"

    def __init__(self, gpt, key, value):
        check_gpt(gpt, "PrefixTuningModel")
        extra = Module()
        extra.params["key"], extra.params["value"] = key, value
        extra.trainable = {"key", "value"}
        L, C = gpt.config.n_layer, gpt.config.n_embd
        for name, a in (("key", key), ("value", value)):
            if a.ndim != 3 or a.shape[0] != L or a.shape[2] != C:
                raise PeftError(f"prefix {name} must have shape (n_layer, P, n_embd) = ({L}, P, "
                                f"{C}); got {tuple(a.shape)}")
        if key.shape != value.shape:
            raise PeftError(f"prefix key {tuple(key.shape)} and value {tuple(value.shape)} differ")
        super().__init__(gpt, extra)
        self.prefix_len = key.shape[1]

    def forward(self, idx, check: bool = True):
        """idx (B, T) -> logits (B, T, V), cache = (the GPT's cache, the L :class:`PrefixKV`)."""
        p = self.children["prefix"].params
        past = [PrefixKV(p["key"][i], p["value"][i]) for i in range(self.config.n_layer)]
        logits, cache = self.gpt.forward(idx, past_kv=past, check=check)
        return logits, (cache, past)

    def backward(self, dlogits, cache):
        """Backpropagate into the GPT's trainable parameters and into the prefix.

        forward: K_l = [broadcast(key[l], B); k_l]  ->  dkey[l] = sum over b of dK_l[b, :P]
        (each layer's :class:`PrefixKV` has summed it; here they are stacked to (L, P, C)).
        """
        gpt_cache, past = cache
        extra = self.gpt.backward(dlogits, gpt_cache)
        prefix = self.children["prefix"]
        if prefix.needs_grad("key"):
            prefix._accumulate("key", xp.stack([pk.dkey for pk in past]))
        if prefix.needs_grad("value"):
            prefix._accumulate("value", xp.stack([pk.dvalue for pk in past]))
        return extra

    def kv_cache(self, batch_size: int, keep: int | None = None) -> KVCache:
        """A generation cache whose first P slots (never re-encoded) hold the prefix."""
        p = self.children["prefix"].params
        kv = self.gpt.kv_cache(batch_size, keep, n_fixed=self.prefix_len)
        kv.set_fixed(p["key"], p["value"])
        return kv


def base_prefix_kv(gpt, idx):
    """The keys and values every attention layer of ``gpt`` computes for the tokens ``idx``
    (1, P): returns (key, value), each (n_layer, P, C). Used for the ``"vocab"`` prefix init."""
    P = idx.shape[1]
    if P > gpt.config.block_size:
        raise ConfigError(f"prefix init 'vocab' runs the base on P={P} tokens, more than its "
                          f"block_size {gpt.config.block_size}; use init='random' or a shorter "
                          "prefix")
    x = gpt.wte.forward(idx)[0] + gpt.wpe.forward(xp.arange(P)[None, :])[0]  # (1, P, C)
    return layer_keys_values(gpt, x)


def add_prefix(gpt, config: PrefixConfig) -> PrefixTuningModel:
    """Freeze ``gpt`` and return it wrapped with a trainable prefix (see :class:`PrefixConfig`).

    Chapter: chapters/04-lora-notes.ipynb
    """
    if not isinstance(config, PrefixConfig):
        raise TypeError(f"config must be a PrefixConfig, got {type(config).__name__}")
    check_gpt(gpt, "prefix tuning")
    rng = backend.cpu_rng(config.seed)
    L, P, C = gpt.config.n_layer, config.prefix_len, gpt.config.n_embd
    if config.init == "vocab":
        key, value = base_prefix_kv(gpt, random_token_ids(gpt, P, rng))
    else:
        key = backend.asarray(rng.standard_normal((L, P, C)) * config.init_std, dtype=gpt.dtype)
        value = backend.asarray(rng.standard_normal((L, P, C)) * config.init_std, dtype=gpt.dtype)
    model = PrefixTuningModel(gpt, xp.ascontiguousarray(key), xp.ascontiguousarray(value))
    model.set_trainable(lambda name: name.startswith("prefix."))
    return model


class PrefixMethod(Method):
    """Prefix tuning: P trainable keys and values at every attention layer (a wrapper model)."""

    name = "prefix"
    example = "--prefix-len 16"
    config_cls = PrefixConfig
    summary = "prefix tuning: P trained keys and values in front of every attention layer's"
    weights_file = "prefix.safetensors"
    file_format = METHOD_FILE_FORMAT
    # prefix and prompt move only a few vectors and want larger rates (one probe on Milton,
    # BENCHMARKS.md "The other PEFT methods on Milton"; Lester et al. use 0.3 with Adafactor)
    lr = (3e-2, 3e-3)
    base_differs = "wrapped"
    file_names = ("prefix",)

    def _apply(self, model, config) -> Tuned:
        return Tuned(add_prefix(model, config), config, self)

    def count_parameters(self, config, model_config) -> int:
        """2 L P C (a key and a value per layer)."""
        return 2 * model_config.n_layer * config.prefix_len * model_config.n_embd

    def save(self, path, tuned: Tuned, tokenizer=None) -> None:
        save_tensors_file(path, self.file_format, tuned, self.trainable(tuned),
                          {"method": self.name, "config": tuned.config.to_dict()})

    def load(self, path, model) -> Tuned:
        config, arrays, saved, paths = read_tensors_file(
            path, self.file_format, "prefix file", model, "config", self.config_cls)
        tuned = self.apply(model, config)
        copy_in(tuned.model, arrays, self.trainable(tuned), str(path), saved, paths)
        return tuned._replace(modules_to_save=tuple(paths))


PREFIX = PrefixMethod()
