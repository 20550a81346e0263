"""Prefix tuning and prompt tuning: new inputs, not new layers.

    prefix tuning   per layer, P trainable keys and values prepended to the attention's keys
                    and values: 2 L P C numbers
    prompt tuning   P trainable vectors prepended to the token embeddings: P C numbers

The GPT already accepts earlier keys and values (``past_kv``, each layer's a
:class:`~minilora.nn.layers.PastKV`: here a :class:`PrefixKV`, which receives its own gradient)
and ``input_embeds`` (whose gradient ``backward`` returns). A thin wrapper module (:class:`PrefixTuningModel`, :class:`PromptTuningModel`)
holds the new parameters in one child (``prefix`` / ``prompt``) and *shares* the GPT's children,
so every base parameter keeps its name (``blocks.0.attn.q.weight``), ``forward_backward(x, y)``
and ``AdamW(model)`` work unchanged, and the logits cover exactly the T real tokens.

Chapter: chapters/04-lora-notes.ipynb (the PEFT taxonomy)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from minilora import backend
from minilora.backend import xp
from minilora.config import ConfigError, JsonConfig, _check_float, _check_int
from minilora.errors import PeftError
from minilora.model import GPT, LanguageModelMixin
from minilora.nn.kv_cache import KVCache
from minilora.nn.layers import Module, PastKV
from minilora.peft.common import _check_gpt

PROMPT_INITS = ("vocab", "random")
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

    prefix_len: int = field(default=16, metadata={"help": "number of prefix keys/values P"})
    init: str = field(default="vocab", metadata={"help": "vocab | random"})
    init_std: float = field(default=1.0, metadata={"help": "std for init='random'"})
    seed: int = field(default=0, metadata={"help": "seed of the initialisation"})

    def __post_init__(self):
        _check_int("prefix_len", self.prefix_len)
        if self.init not in PREFIX_INITS:
            raise ConfigError(f"prefix init must be one of {list(PREFIX_INITS)}; got {self.init!r}")
        _check_float("init_std", self.init_std, lo=0.0, lo_open=True)
        _check_int("seed", self.seed, lo=0)


@dataclass(frozen=True)
class PromptConfig(JsonConfig):
    """Prompt tuning (Lester et al. 2021): P trainable "soft prompt" vectors before the tokens.

    The prompt ``prompt.weight`` (P, C) is prepended to the token embeddings; positions 0..P-1
    go to the prompt and P..P+T-1 to the tokens, so P + T <= block_size. Only the logits of the T
    real tokens are returned and scored.

    Attributes:
        prompt_len: P, 1 <= P < block_size of the base model.
        init: ``"vocab"`` (default): the base's embeddings of P token ids drawn uniformly from the
            vocabulary (Lester et al. draw from the 5,000 most common tokens; our vocabulary has
            97); ``"random"``: N(0, s^2) with s the std of the base's token embedding table.
        seed: seeds the CPU generator of the initialisation.
    """

    prompt_len: int = field(default=16, metadata={"help": "number of soft prompt vectors P"})
    init: str = field(default="vocab", metadata={"help": "vocab | random"})
    seed: int = field(default=0, metadata={"help": "seed of the initialisation"})

    def __post_init__(self):
        _check_int("prompt_len", self.prompt_len)
        if self.init not in PROMPT_INITS:
            raise ConfigError(f"prompt init must be one of {list(PROMPT_INITS)}; got {self.init!r}")
        _check_int("seed", self.seed, lo=0)

class _GPTWrapper(LanguageModelMixin, Module):
    """A GPT plus extra inputs. Shares the GPT's children (same objects, same names) and adds one
    child of its own, so ``named_parameters()`` = the GPT's names + the new ones.

    Subclasses implement ``forward(idx, check)`` -> (logits (B, T, V), cache) and
    ``backward(dlogits, cache)``; ``forward_backward`` / ``loss`` / ``config`` / ``dtype`` follow
    the GPT's contract so the training harness cannot tell the difference.
    """

    extra_name = "?"

    def __init__(self, gpt, extra: Module):
        super().__init__()
        self.gpt = gpt
        self.children = dict(gpt.children)  # the same module objects: one set of weights
        self.add(self.extra_name, extra)
        self.config = gpt.config

    @property
    def dtype(self):
        return self.gpt.dtype

    def check_input(self, idx) -> None:
        self.gpt.check_input(idx)

    def forward_incremental(self, idx, kv: KVCache, check: bool = True):
        """Generation: the GPT's, on a cache from this wrapper's :meth:`kv_cache` (whose fixed
        slots hold the prefix / the soft prompt's keys)."""
        return self.gpt.forward_incremental(idx, kv, check=check)


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


class PrefixTuningModel(_GPTWrapper):
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
        _check_gpt(gpt, "PrefixTuningModel")
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


class PromptTuningModel(_GPTWrapper):
    """A frozen GPT reading P trainable soft-prompt vectors before the tokens.

    emb = [prompt.weight; wte[idx]] + wpe[0 : P + T]        (B, P + T, C)
    logits = GPT(emb)[:, P:]                                 (B, T, V)  only the real tokens

    ``config`` is the GPT's with ``block_size`` reduced by P (the longest context of real tokens
    this model accepts), so the harness's length checks stay right; the base's own config is
    ``gpt.config``.

    Chapter: chapters/04-lora-notes.ipynb
    """

    extra_name = "prompt"

    def __init__(self, gpt, prompt):
        _check_gpt(gpt, "PromptTuningModel")
        C, T = gpt.config.n_embd, gpt.config.block_size
        if prompt.ndim != 2 or prompt.shape[1] != C:
            raise PeftError(f"soft prompt must have shape (P, n_embd) = (P, {C}); got "
                            f"{tuple(prompt.shape)}")
        if prompt.shape[0] >= T:
            raise ConfigError(f"prompt_len P={prompt.shape[0]} leaves no room for tokens in the "
                              f"base's block_size {T}: need P < {T} (and P + T_tokens <= {T})")
        extra = Module()
        extra.params["weight"] = prompt
        extra.trainable = {"weight"}
        super().__init__(gpt, extra)
        self.prompt_len = prompt.shape[0]
        self.config = dataclasses.replace(gpt.config, block_size=T - self.prompt_len)

    def check_input(self, idx) -> None:
        GPT.check_input(self, idx)  # against block_size - P: the message names the real limit

    def forward(self, idx, check: bool = True):
        """idx (B, T) with P + T <= block_size -> logits (B, T, V), cache."""
        if check:
            self.check_input(idx)
        B = idx.shape[0]
        w = self.children["prompt"].params["weight"]
        logits, cache = self.gpt.forward(idx, input_embeds=xp.broadcast_to(w, (B, *w.shape)),
                                         check=False)
        return logits[:, self.prompt_len:], cache

    def backward(self, dlogits, cache):
        """forward: logits = full[:, P:]  ->  dfull = [0; dlogits];
        forward: emb[:, :P] = broadcast(prompt, B)  ->  dprompt = sum over b of demb[b, :P]."""
        B, T, V = dlogits.shape
        P = self.prompt_len
        dfull = xp.zeros((B, P + T, V), dtype=dlogits.dtype)
        dfull[:, P:] = dlogits
        extra = self.gpt.backward(dfull, cache)
        prompt = self.children["prompt"]
        if prompt.needs_grad("weight"):
            prompt._accumulate("weight", extra["input_embeds"].sum(axis=0))
        return extra

    def kv_cache(self, batch_size: int, keep: int | None = None) -> KVCache:
        """A generation cache whose first P slots (never re-encoded) hold the keys and values
        every layer computes for the soft prompt at positions 0 .. P-1; the tokens follow from
        position P on."""
        P = self.prompt_len
        w = self.children["prompt"].params["weight"]
        x = w[None] + self.gpt.wpe.params["weight"][None, :P]  # (1, P, C)
        key, value = _keys_values(self.gpt, x)
        kv = self.gpt.kv_cache(batch_size, keep, n_fixed=P, first_position=P)
        kv.set_fixed(key, value)
        return kv


def _vocab_ids(gpt, n: int, rng):
    return backend.asarray(rng.integers(0, gpt.config.vocab_size, size=(1, n)))


def _keys_values(gpt, x):
    """The keys and values every attention layer of ``gpt`` computes for the inputs ``x``
    (1, P, C) (embeddings, positions included): (key, value), each (n_layer, P, C)."""
    keys, values = [], []
    for blk in gpt.blocks:
        a = blk.ln_1.forward(x)[0]
        keys.append(blk.attn.k.forward(a)[0][0])  # (P, C)
        values.append(blk.attn.v.forward(a)[0][0])
        x = blk.forward(x)[0]
    return xp.stack(keys), xp.stack(values)


def base_prefix_kv(gpt, idx):
    """The keys and values every attention layer of ``gpt`` computes for the tokens ``idx``
    (1, P): returns (key, value), each (n_layer, P, C). Used for the ``"vocab"`` prefix init."""
    P = idx.shape[1]
    if P > gpt.config.block_size:
        raise ConfigError(f"prefix init 'vocab' runs the base on P={P} tokens, more than its "
                          f"block_size {gpt.config.block_size}; use init='random' or a shorter "
                          "prefix")
    x = gpt.wte.forward(idx)[0] + gpt.wpe.forward(xp.arange(P)[None, :])[0]  # (1, P, C)
    return _keys_values(gpt, x)


def add_prefix(gpt, config: PrefixConfig) -> PrefixTuningModel:
    """Freeze ``gpt`` and return it wrapped with a trainable prefix (see :class:`PrefixConfig`).

    Chapter: chapters/04-lora-notes.ipynb
    """
    if not isinstance(config, PrefixConfig):
        raise TypeError(f"config must be a PrefixConfig, got {type(config).__name__}")
    _check_gpt(gpt, "prefix tuning")
    rng = backend.cpu_rng(config.seed)
    L, P, C = gpt.config.n_layer, config.prefix_len, gpt.config.n_embd
    if config.init == "vocab":
        key, value = base_prefix_kv(gpt, _vocab_ids(gpt, P, rng))
    else:
        key = backend.asarray(rng.standard_normal((L, P, C)) * config.init_std, dtype=gpt.dtype)
        value = backend.asarray(rng.standard_normal((L, P, C)) * config.init_std, dtype=gpt.dtype)
    model = PrefixTuningModel(gpt, xp.ascontiguousarray(key), xp.ascontiguousarray(value))
    model.set_trainable(lambda name: name.startswith("prefix."))
    return model


def add_prompt(gpt, config: PromptConfig) -> PromptTuningModel:
    """Freeze ``gpt`` and return it wrapped with a trainable soft prompt (:class:`PromptConfig`).

    Chapter: chapters/04-lora-notes.ipynb
    """
    if not isinstance(config, PromptConfig):
        raise TypeError(f"config must be a PromptConfig, got {type(config).__name__}")
    _check_gpt(gpt, "prompt tuning")
    P, T = config.prompt_len, gpt.config.block_size
    if P >= T:
        raise ConfigError(f"prompt_len={P} must be < the base's block_size {T} (the prompt and "
                          f"the tokens share the {T} positions)")
    rng = backend.cpu_rng(config.seed)
    wte = gpt.wte.params["weight"]
    if config.init == "vocab":
        prompt = wte[_vocab_ids(gpt, P, rng)[0]]  # (P, C), a copy
    else:
        std = float(backend.to_scalar(wte.std()))
        prompt = backend.asarray(rng.standard_normal((P, wte.shape[1])) * std, dtype=wte.dtype)
    model = PromptTuningModel(gpt, xp.ascontiguousarray(prompt))
    model.set_trainable(lambda name: name.startswith("prompt."))
    return model
