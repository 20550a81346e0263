"""The other PEFT methods of the taxonomy: Houlsby adapters, prefix tuning, prompt tuning, BitFit.

Each method freezes the base GPT and trains a small set of new (or selected) numbers; every
backward pass is written by hand and gradchecked (``tests/test_peft_methods.py``)::

    Houlsby adapter  h -> h + up(gelu(down(h)))  after attn.o and after mlp.down     (additive,
                     2md + d + m per adapter, m = bottleneck)                         new layers)
    prefix tuning    per layer, P trainable keys and values prepended to the         (new inputs
                     attention's keys and values: 2 L P C numbers                     to attention)
    prompt tuning    P trainable vectors prepended to the token embeddings: P C      (new input)
    BitFit           only the existing biases train                                  (selective)

One-line use (the harness does this via :data:`minilora.finetune.METHODS`)::

    model = apply_peft(base_gpt, AdapterConfig(bottleneck=16))   # or PrefixConfig(prefix_len=16),
    ...train model...                                            #    PromptConfig, BitFitConfig
    save_peft("houlsby.safetensors", model, config)              # the small tensors + the config
    model2, config = load_peft("houlsby.safetensors", fresh_base_gpt)

Where the state lives, and why:

* Adapters are **injected**: :class:`HoulsbyAdapter` wraps the block's ``attn.o`` / ``mlp.down``
  Linear (it adopts the base's ``weight`` / ``bias`` arrays under the same names, so a base
  checkpoint still loads by name, and adds two child Linears ``adapter_down`` / ``adapter_up``).
  The model stays a :class:`~minilora.model.GPT`.
* Prefix and prompt tuning add **inputs**, not layers: the GPT already accepts ``prefix_kv`` and
  ``input_embeds`` and returns their gradients from ``backward``. A thin wrapper module
  (:class:`PrefixTuningModel`, :class:`PromptTuningModel`) holds the new parameters in one child
  (``prefix`` / ``prompt``) and *shares* the GPT's children, so every base parameter keeps its
  name (``blocks.0.attn.q.weight``), the harness's ``forward(idx, check=False)`` /
  ``forward_backward(x, y)`` / ``AdamW(model)`` work unchanged, and the logits cover exactly the
  T real tokens. Putting the prefix inside every attention layer would also work, but would
  duplicate the attention's forward/backward code in a second class.
* BitFit changes only which parameters are trainable.

Chapter: chapters/02-lora-notes.ipynb (the PEFT taxonomy)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from minilora import backend
from minilora.backend import xp
from minilora.config import ConfigError, GPTConfig, JsonConfig, _check_float, _check_int
from minilora.nn import ops
from minilora.model import LanguageModelMixin
from minilora.nn.layers import LayerNorm, Linear, Module
from minilora.errors import MiniloraError

PEFT_FORMAT = "minilora-peft-v1"
ADAPTER_TARGETS = ("o", "down")  # Houlsby: after the attention output projection and the MLP
PROMPT_INITS = ("vocab", "random")
PREFIX_INITS = ("vocab", "random")


class PeftError(MiniloraError, ValueError):
    """A PEFT method cannot be applied or loaded as asked (wrong model, shapes, files)."""


# ----------------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AdapterConfig(JsonConfig):
    """Houlsby bottleneck adapters (Houlsby et al. 2019).

    adapter(h) = h + up(gelu(down(h)))       down (m, d) + bias (m,), up (d, m) + bias (d,)

    Attributes:
        bottleneck: m, the adapter's inner width (1 <= m <= n_embd). Houlsby's code default 64.
        targets: after which Linears of each block: ``"o"`` (attention output projection) and
            ``"down"`` (MLP output projection), the paper's two places; either alone is allowed.
        init_std: std of the truncated (at 2 std) normal init of the adapter weights (the
            paper's 1e-2; biases start at zero).
        zero_up: start the up projection at exactly zero, so the adapter is exactly the identity
            at step 0 (as LoRA's B = 0); False draws it like ``down`` (the paper: near-identity).
        train_layernorm: also train every LayerNorm's weight and bias, as Houlsby et al. do
            ("we also train new layer normalization parameters per task"); off by default so
            the comparison with LoRA trains adapters only.
        seed: seeds the CPU generator of the initial weights.
    """

    bottleneck: int = field(default=16, metadata={"help": "adapter inner width m"})
    targets: tuple = field(default=ADAPTER_TARGETS, metadata={"help": "o and/or down"})
    init_std: float = field(default=1e-2, metadata={"help": "std of the truncated normal init"})
    zero_up: bool = field(default=True, metadata={"help": "up projection starts at zero"})
    train_layernorm: bool = field(default=False, metadata={"help": "train the LayerNorms too"})
    seed: int = field(default=0, metadata={"help": "seed of the initial weights"})

    def __post_init__(self):
        _check_int("bottleneck", self.bottleneck)
        targets = (self.targets,) if isinstance(self.targets, str) else self.targets
        if (not isinstance(targets, (tuple, list)) or not targets
                or any(t not in ADAPTER_TARGETS for t in targets)):
            raise ConfigError(f"adapter targets must be a non-empty subset of "
                              f"{list(ADAPTER_TARGETS)}; got {self.targets!r}")
        object.__setattr__(self, "targets", tuple(dict.fromkeys(targets)))
        _check_float("init_std", self.init_std, lo=0.0, lo_open=True)
        for name in ("zero_up", "train_layernorm"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        _check_int("seed", self.seed, lo=0)


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


@dataclass(frozen=True)
class BitFitConfig(JsonConfig):
    """BitFit (Ben Zaken et al. 2021): train only the bias terms, freeze every weight.

    Attributes:
        layernorm: also train the LayerNorm biases (beta). BitFit trains "the bias terms" of
            BERT, whose LayerNorms have biases too; with False only the Linear biases (q, k, v,
            o, up, down) train. LayerNorm *gains* never train. Our ``lm_head`` has no bias.
    """

    layernorm: bool = field(default=True, metadata={"help": "train LayerNorm biases too"})

    def __post_init__(self):
        if not isinstance(self.layernorm, bool):
            raise ConfigError(f"layernorm must be true or false, got {self.layernorm!r}")


#: method name (as in minilora.finetune.METHODS) -> config class
CONFIGS = {"adapter": AdapterConfig, "prefix": PrefixConfig, "prompt": PromptConfig,
           "bitfit": BitFitConfig}


def _method_of(config) -> str:
    for name, cls in CONFIGS.items():
        if isinstance(config, cls):
            return name
    raise TypeError(f"config must be one of {', '.join(c.__name__ for c in CONFIGS.values())}; "
                    f"got {type(config).__name__}")


# ----------------------------------------------------------------------------------------------
# Houlsby adapter
# ----------------------------------------------------------------------------------------------
def _truncated_normal(rng, shape, std):
    """N(0, std^2) redrawn until inside +-2 std (TensorFlow's truncated_normal), CPU float64."""
    a = rng.standard_normal(shape)
    bad = abs(a) > 2.0
    while bad.any():
        a[bad] = rng.standard_normal(int(bad.sum()))
        bad = abs(a) > 2.0
    return a * std


class HoulsbyAdapter(Module):
    """A frozen :class:`~minilora.nn.layers.Linear` followed by a bottleneck adapter.

    y   = x @ W0.T + b                      (..., d)    the wrapped sub-layer output
    h   = y @ W_down.T + b_down             (..., m)
    out = y + gelu(h) @ W_up.T + b_up       (..., d)    the adapter's internal skip connection

    It wraps rather than subclasses: it adopts the base's ``weight`` and ``bias`` arrays under the
    same names and adds the children ``adapter_down`` (Linear (m, d)) and ``adapter_up`` (Linear
    (d, m)). The adapter cannot be merged into W0 (gelu sits between the projections), so it adds
    two sequential GEMMs per wrapped layer at inference: the latency cost the LoRA paper measures
    (``minilora bench``, section ``peft_latency``).

    Args:
        base: the Linear to wrap (d_out = d).
        bottleneck: m.
        init_std: std of the truncated normal init of ``W_down`` (and ``W_up`` unless zero_up).
        zero_up: W_up = 0 and b_up = 0, so ``out == y`` exactly at step 0.
        rng: int seed or NumPy Generator (drawn on the CPU).

    Chapter: chapters/02-lora-notes.ipynb
    """

    def __init__(self, base: Linear, bottleneck: int, init_std: float = 1e-2,
                 zero_up: bool = True, rng=0):
        super().__init__()
        if not isinstance(base, Linear):
            raise TypeError(f"HoulsbyAdapter wraps a minilora Linear, got {type(base).__name__}")
        _check_int("bottleneck", bottleneck)
        w = base.params["weight"]
        d = w.shape[0]
        if bottleneck > d:
            raise ConfigError(f"bottleneck m={bottleneck} is wider than the layer's output d={d}: "
                              f"an adapter projects down to m < d; use bottleneck <= {d}")
        rng = backend.cpu_rng(rng)
        self.params["weight"] = w
        if "bias" in base.params:
            self.params["bias"] = base.params["bias"]
        dt = w.dtype
        w_down = backend.asarray(_truncated_normal(rng, (bottleneck, d), init_std), dtype=dt)
        w_up = (xp.zeros((d, bottleneck), dtype=dt) if zero_up else
                backend.asarray(_truncated_normal(rng, (d, bottleneck), init_std), dtype=dt))
        self.adapter_down = self.add("adapter_down",
                                     Linear(w_down, xp.zeros((bottleneck,), dtype=dt)))
        self.adapter_up = self.add("adapter_up", Linear(w_up, xp.zeros((d,), dtype=dt)))
        self.bottleneck = bottleneck
        self.trainable = set()  # the wrapped W0, b are frozen; the children train

    def forward(self, x):
        """x (..., d_in) -> out (..., d), cache (base cache, down cache, gelu cache, up cache)."""
        y, c_base = ops.linear_forward(x, self.params["weight"], self.params.get("bias"),
                                       keep_x=self.needs_grad("weight"))
        h, c_down = self.adapter_down.forward(y)  # (..., m)
        g, c_gelu = ops.gelu_forward(h)
        out, c_up = self.adapter_up.forward(g)  # (..., d), a fresh array
        out += y  # the adapter's skip connection
        return out, (c_base, c_down, c_gelu, c_up)

    def backward(self, dout, cache, need_dx: bool = True):
        """dout (..., d) -> dx (..., d_in) or None; adds into the trainable parameters' grads.

        forward: out = y + up(g)   -> dy = dout + d(up(g))/dy,  g = gelu(h),  h = down(y)
        dg = dout @ W_up;  dh = gelu'(h) * dg;  dy = dout + dh @ W_down;  dx = dy @ W0
        """
        c_base, c_down, c_gelu, c_up = cache
        dg = self.adapter_up.backward(dout, c_up)  # (..., m)
        dh = ops.gelu_backward(dg, c_gelu)
        dy = self.adapter_down.backward(dh, c_down)  # (..., d)
        dy += dout  # skip connection
        dx, dw, db = ops.linear_backward(dy, c_base, need_dx=need_dx,
                                         need_dw=self.needs_grad("weight"),
                                         need_db=self.needs_grad("bias"))
        self._accumulate("weight", dw)
        self._accumulate("bias", db)
        return dx


def adapter_layers(model: Module) -> dict:
    """``{module name: HoulsbyAdapter}`` for every adapter in ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, HoulsbyAdapter)}


def inject_adapters(model: Module, config: AdapterConfig) -> dict:
    """Wrap ``attn.o`` and/or ``mlp.down`` of every block in a :class:`HoulsbyAdapter`, in place,
    and freeze everything else (LayerNorms train too with ``config.train_layernorm``).

    Weights are drawn from one CPU generator seeded with ``config.seed``, in block order.
    Returns ``{"trainable", "total", "percent", "targets"}`` like :func:`minilora.lora.inject_lora`.
    Raises :class:`PeftError` if the model already has adapters or has no such layers.

    Chapter: chapters/02-lora-notes.ipynb
    """
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"config must be an AdapterConfig, got {type(config).__name__}")
    if adapter_layers(model):
        raise PeftError("the model already has Houlsby adapters; inject once per model")
    modules = dict(model.named_modules())
    targets = [n for n, m in modules.items()
               if n.startswith("blocks.") and n.rsplit(".", 1)[-1] in config.targets]
    if not targets:
        raise PeftError(f"no module named {list(config.targets)} inside blocks.* of this model")
    for name in targets:
        if not isinstance(modules[name], Linear):
            raise PeftError(f"module {name!r} is a {type(modules[name]).__name__}, not a plain "
                            "Linear (another method already wraps it?); adapters wrap Linears")
        d = modules[name].params["weight"].shape[0]
        if config.bottleneck > d:
            raise ConfigError(f"bottleneck={config.bottleneck} exceeds the output width {d} of "
                              f"{name!r}: use bottleneck <= {d}")
    rng = backend.cpu_rng(config.seed)
    for name in targets:
        parent, _, child = name.rpartition(".")
        modules[parent].replace(child, HoulsbyAdapter(modules[name], config.bottleneck,
                                                      config.init_std, config.zero_up, rng))
    model.set_trainable(_trainable_predicate(config))
    trainable, total = model.num_parameters(trainable_only=True), model.num_parameters()
    return {"trainable": trainable, "total": total, "percent": 100.0 * trainable / total,
            "targets": targets}


# ----------------------------------------------------------------------------------------------
# prefix and prompt tuning: a wrapper that shares the GPT's children
# ----------------------------------------------------------------------------------------------
def _check_gpt(gpt, what: str) -> None:
    from minilora.model import GPT

    if not isinstance(gpt, GPT):
        raise TypeError(f"{what} wraps a minilora GPT, got {type(gpt).__name__}")


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


class PrefixTuningModel(_GPTWrapper):
    """A frozen GPT whose every attention layer also attends to P trainable keys and values.

    For layer l:  K_l = [prefix.key[l]; x W_k^T + b_k]   V_l = [prefix.value[l]; x W_v^T + b_v]
    (each (B, P + T, C), the prefix broadcast over the batch), so every query attends to the P
    prefix slots plus the causal past. Parameters: ``prefix.key``, ``prefix.value`` (L, P, C).
    Gradients: ``GPT.backward`` returns d(prefix_kv) per layer, (B, P, C); the prefix gets their
    sum over the batch.

    No prefix leaves the model exactly unchanged: the prefix slots always take some of the
    softmax mass, so unlike a zero-initialised LoRA or adapter the logits differ from the base's
    at step 0 (the ``"vocab"`` init makes them the base's own keys/values of real tokens).

    Chapter: chapters/02-lora-notes.ipynb
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
        """idx (B, T) -> logits (B, T, V), cache (the GPT's)."""
        B = idx.shape[0]
        p = self.children["prefix"].params
        P, C = self.prefix_len, self.config.n_embd
        prefix_kv = [(xp.broadcast_to(p["key"][i], (B, P, C)),
                      xp.broadcast_to(p["value"][i], (B, P, C)))
                     for i in range(self.config.n_layer)]
        return self.gpt.forward(idx, prefix_kv=prefix_kv, check=check)

    def backward(self, dlogits, cache):
        """Backpropagate into the GPT's trainable parameters and into the prefix.

        forward: pk_l = broadcast(key[l], B)  ->  dkey[l] = sum over b of dpk_l[b]   (P, C)
        """
        extra = self.gpt.backward(dlogits, cache)
        prefix = self.children["prefix"]
        dkv = extra["prefix_kv"]
        if prefix.needs_grad("key"):
            prefix._accumulate("key", xp.stack([dk.sum(axis=0) for dk, _ in dkv]))
        if prefix.needs_grad("value"):
            prefix._accumulate("value", xp.stack([dv.sum(axis=0) for _, dv in dkv]))
        return extra


class PromptTuningModel(_GPTWrapper):
    """A frozen GPT reading P trainable soft-prompt vectors before the tokens.

    emb = [prompt.weight; wte[idx]] + wpe[0 : P + T]        (B, P + T, C)
    logits = GPT(emb)[:, P:]                                 (B, T, V)  only the real tokens

    ``config`` is the GPT's with ``block_size`` reduced by P (the longest context of real tokens
    this model accepts), so the harness's length checks stay right; the base's own config is
    ``gpt.config``.

    Chapter: chapters/02-lora-notes.ipynb
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
        from minilora.model import GPT
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


def _vocab_ids(gpt, n: int, rng):
    return backend.asarray(rng.integers(0, gpt.config.vocab_size, size=(1, n)))


def base_prefix_kv(gpt, idx):
    """The keys and values every attention layer of ``gpt`` computes for the tokens ``idx``
    (1, P): returns (key, value), each (n_layer, P, C). Used for the ``"vocab"`` prefix init."""
    P = idx.shape[1]
    if P > gpt.config.block_size:
        raise ConfigError(f"prefix init 'vocab' runs the base on P={P} tokens, more than its "
                          f"block_size {gpt.config.block_size}; use init='random' or a shorter "
                          "prefix")
    x = gpt.wte.forward(idx)[0] + gpt.wpe.forward(xp.arange(P)[None, :])[0]  # (1, P, C)
    keys, values = [], []
    for blk in gpt.blocks:
        a = blk.ln_1.forward(x)[0]
        keys.append(blk.attn.k.forward(a)[0][0])  # (P, C)
        values.append(blk.attn.v.forward(a)[0][0])
        x = blk.forward(x)[0]
    return xp.stack(keys), xp.stack(values)


def add_prefix(gpt, config: PrefixConfig) -> PrefixTuningModel:
    """Freeze ``gpt`` and return it wrapped with a trainable prefix (see :class:`PrefixConfig`).

    Chapter: chapters/02-lora-notes.ipynb
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
    model.set_trainable(_trainable_predicate(config))
    return model


def add_prompt(gpt, config: PromptConfig) -> PromptTuningModel:
    """Freeze ``gpt`` and return it wrapped with a trainable soft prompt (:class:`PromptConfig`).

    Chapter: chapters/02-lora-notes.ipynb
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
    model.set_trainable(_trainable_predicate(config))
    return model


# ----------------------------------------------------------------------------------------------
# BitFit
# ----------------------------------------------------------------------------------------------
def _layernorm_param_names(model: Module) -> set:
    return {f"{mn}.{k}" if mn else k for mn, m in model.named_modules()
            if isinstance(m, LayerNorm) for k in m.params}


def apply_bitfit(model: Module, config: BitFitConfig) -> dict:
    """Freeze every parameter except the biases (see :class:`BitFitConfig`); returns the report
    ``{"trainable", "total", "percent", "targets": [bias names]}``.

    Chapter: chapters/02-lora-notes.ipynb
    """
    if not isinstance(config, BitFitConfig):
        raise TypeError(f"config must be a BitFitConfig, got {type(config).__name__}")
    pred = _trainable_predicate(config, model)
    names = [n for n, _ in model.named_parameters() if pred(n)]
    if not names:
        raise PeftError("BitFit found no bias to train: the model was built with bias=False and "
                        "layernorm=False leaves out the LayerNorm biases; use layernorm=True")
    model.set_trainable(pred)
    trainable, total = model.num_parameters(trainable_only=True), model.num_parameters()
    return {"trainable": trainable, "total": total, "percent": 100.0 * trainable / total,
            "targets": names}


# ----------------------------------------------------------------------------------------------
# one entry point per idea: apply, trainable set, count, save, load
# ----------------------------------------------------------------------------------------------
def _trainable_predicate(config, model: Module | None = None):
    """name -> bool: the parameters a method trains (and saves)."""
    if isinstance(config, AdapterConfig):
        def pred(name):
            parts = name.split(".")
            return (any(p.startswith("adapter_") for p in parts)
                    or (config.train_layernorm and any(p in ("ln_1", "ln_2", "ln_f")
                                                       for p in parts)))
        return pred
    if isinstance(config, PrefixConfig):
        return lambda name: name.startswith("prefix.")
    if isinstance(config, PromptConfig):
        return lambda name: name.startswith("prompt.")
    if isinstance(config, BitFitConfig):
        ln = _layernorm_param_names(model)
        return lambda name: name.endswith(".bias") and (config.layernorm or name not in ln)
    raise TypeError(f"not a PEFT method config: {type(config).__name__}")


def apply_peft(model, config):
    """Apply the method ``config`` stands for to a GPT; returns the model to train (the same
    object for adapters and BitFit, a wrapper for prefix and prompt tuning).

    Chapter: chapters/02-lora-notes.ipynb
    """
    method = _method_of(config)
    if method == "adapter":
        inject_adapters(model, config)
        return model
    if method == "bitfit":
        apply_bitfit(model, config)
        return model
    return add_prefix(model, config) if method == "prefix" else add_prompt(model, config)


def count_peft_parameters(config, model_config: GPTConfig) -> int:
    """Closed-form number of trainable parameters of ``apply_peft(GPT(model_config), config)``.

    adapter: n_adapters (2 m C + C + m), n_adapters = L len(targets)   (Houlsby: 2md + d + m)
             + L 2 (2C) + 2C with train_layernorm (gain and bias of ln_1, ln_2 per block, ln_f)
    prefix:  2 L P C                                                     (key and value per layer)
    prompt:  P C
    bitfit:  L (4C [q,k,v,o] + 4C [up] + C [down]) if the Linears have biases,
             + L 2C + C with layernorm (the biases of ln_1, ln_2, ln_f)

    Chapter: chapters/02-lora-notes.ipynb
    """
    L, C = model_config.n_layer, model_config.n_embd
    method = _method_of(config)
    if method == "adapter":
        m = config.bottleneck
        n = L * len(config.targets) * (2 * m * C + C + m)
        return n + (L * 2 * 2 * C + 2 * C if config.train_layernorm else 0)
    if method == "prefix":
        return 2 * L * config.prefix_len * C
    if method == "prompt":
        return config.prompt_len * C
    n = L * (4 * C + 4 * C + C) if model_config.bias else 0
    return n + (L * 2 * C + C if config.layernorm else 0)


def _base_gpt(model):
    return model.gpt if isinstance(model, _GPTWrapper) else model


def peft_state_dict(model, config) -> dict:
    """The method's tensors by parameter name (the arrays themselves, on the active backend)."""
    pred = _trainable_predicate(config, model)
    return {n: p for n, p in model.named_parameters() if pred(n)}


def save_peft(path, model, config) -> None:
    """Write only the method's small tensors (safetensors) with a JSON header holding the
    method, its config and the base model's config; atomic (:func:`checkpoint.save_arrays`).

    Chapter: chapters/02-lora-notes.ipynb
    """
    from minilora.checkpoint import save_arrays

    method = _method_of(config)
    arrays = peft_state_dict(model, config)
    if not arrays:
        raise PeftError(f"save_peft: the model holds no {method} parameters; apply the method "
                        "first (apply_peft)")
    meta = {"format": PEFT_FORMAT, "method": method, "config": config.to_dict(),
            "model_config": _base_gpt(model).config.to_dict()}
    save_arrays(path, arrays, meta)


def load_peft(path, model):
    """Apply a file from :func:`save_peft` to a fresh base GPT; returns ``(model, config)``, where
    ``model`` is what :func:`apply_peft` returns (a wrapper for prefix / prompt tuning).

    The saved base shape must match (vocab_size, n_embd, n_layer, n_head, bias); every saved name
    must be one of the method's parameters with the same shape; all are checked before anything
    is written.

    Chapter: chapters/02-lora-notes.ipynb
    """
    from minilora.checkpoint import CheckpointError, load_arrays

    arrays, meta = load_arrays(path)
    if meta.get("format") != PEFT_FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a minilora PEFT file (format "
                              f"{meta.get('format')!r}, expected {PEFT_FORMAT!r})")
    method = meta.get("method")
    if method not in CONFIGS:
        raise CheckpointError(f"{str(path)!r}: unknown PEFT method {method!r}; allowed: "
                              f"{', '.join(CONFIGS)}")
    try:
        config = CONFIGS[method].from_dict(meta["config"])
    except (KeyError, ConfigError, TypeError) as e:
        raise CheckpointError(f"{str(path)!r} has an invalid {method} config: {e}") from None
    saved, ours = meta.get("model_config") or {}, model.config.to_dict()
    diff = {k: (v, ours.get(k)) for k, v in saved.items()
            if k in ("vocab_size", "n_embd", "n_layer", "n_head", "bias") and ours.get(k) != v}
    if diff:
        raise PeftError(f"{str(path)!r} was built for another base model: "
                        + ", ".join(f"{k} {a} (file) vs {b} (model)" for k, (a, b) in diff.items()))
    model = apply_peft(model, config)
    slots = {n: (m, k) for n, m, k in model._slots()}
    wanted = peft_state_dict(model, config)
    unexpected = sorted(set(arrays) - set(wanted))
    missing = sorted(set(wanted) - set(arrays))
    if unexpected or missing:
        raise PeftError(f"{str(path)!r} does not match the {method} parameters of this model: "
                        f"missing {missing[:4]}, unexpected {unexpected[:4]}")
    for n, a in arrays.items():
        if tuple(a.shape) != tuple(wanted[n].shape):
            raise PeftError(f"{str(path)!r}: tensor {n!r} has shape {tuple(a.shape)}, the model's "
                            f"is {tuple(wanted[n].shape)}")
    for n, a in arrays.items():
        m, k = slots[n]
        m.params[k] = backend.asarray(a, dtype=m.params[k].dtype)
    return model, config


# ----------------------------------------------------------------------------------------------
# the fine-tuning harness (minilora.finetune.METHODS)
# ----------------------------------------------------------------------------------------------
#: default (lr, min_lr) of each method in the harness (200 steps of 8 x 128 on the base model).
#: adapter as LoRA; prefix and prompt move only a few vectors and want more (one probe each on
#: Milton: prefix 1e-2 -> 3e-2 took the test loss 1.827 -> 1.748, prompt 3e-2 -> 1e-1 took
#: 1.827 -> 1.820; Lester et al. use 0.3 with Adafactor); BitFit 1e-2 (no sweep).
DEFAULT_LR = {"adapter": (5e-3, 5e-4), "prefix": (3e-2, 3e-3), "prompt": (1e-1, 1e-2),
              "bitfit": (1e-2, 1e-3)}
WEIGHTS_FILE = {"adapter": "houlsby.safetensors", "prefix": "prefix.safetensors",
                "prompt": "prompt.safetensors", "bitfit": "bitfit.safetensors"}


def _setup(method: str, model, config):
    from minilora.finetune import MethodSetup

    cls = CONFIGS[method]
    config = cls() if config is None else config
    if isinstance(config, dict):
        config = cls.from_dict(config)
    if not isinstance(config, cls):
        raise TypeError(f"method {method!r} needs a {cls.__name__}, got {type(config).__name__}")
    model = apply_peft(model, config)

    def save(out: Path) -> str:
        save_peft(Path(out) / WEIGHTS_FILE[method], model, config)
        return WEIGHTS_FILE[method]

    lr, min_lr = DEFAULT_LR[method]
    # prefix / prompt: the wrapped GPT is the untouched base (its outputs differ at step 0)
    base = model.gpt if isinstance(model, _GPTWrapper) else None
    return MethodSetup(model, config.to_dict(), save, lr, min_lr, base)


def setup_adapter(model, tok, config):
    """Harness setup for Houlsby adapters (default bottleneck 16 after attn.o and mlp.down)."""
    return _setup("adapter", model, config)


def setup_prefix(model, tok, config):
    """Harness setup for prefix tuning (default P = 16, "vocab" init)."""
    return _setup("prefix", model, config)


def setup_prompt(model, tok, config):
    """Harness setup for prompt tuning (default P = 16, "vocab" init)."""
    return _setup("prompt", model, config)


def setup_bitfit(model, tok, config):
    """Harness setup for BitFit (Linear and LayerNorm biases)."""
    return _setup("bitfit", model, config)


__all__ = ["AdapterConfig", "PrefixConfig", "PromptConfig", "BitFitConfig", "CONFIGS",
           "PeftError", "HoulsbyAdapter", "adapter_layers", "inject_adapters",
           "PrefixTuningModel", "PromptTuningModel", "base_prefix_kv", "add_prefix", "add_prompt",
           "apply_bitfit", "apply_peft", "count_peft_parameters", "peft_state_dict", "save_peft",
           "load_peft", "setup_adapter", "setup_prefix", "setup_prompt", "setup_bitfit"]
