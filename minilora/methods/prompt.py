"""Prompt tuning (Lester et al. 2021): P trainable "soft prompt" vectors before the tokens.

    prompt tuning   P trainable vectors prepended to the token embeddings: P C numbers

The GPT's forward is two parts, the embedding (tokens + positions) and the stack (blocks, final
LayerNorm, head); :class:`PromptTuningModel` composes them from outside: it embeds the tokens,
puts the prompt in front, adds the positions of all P + T inputs and runs the stack. A thin
wrapper holds the prompt in one child (``prompt``) and *shares* the GPT's children, so every
base parameter keeps its name and the logits cover exactly the T real tokens.

Chapter: chapters/04-lora-notes.ipynb (the PEFT taxonomy)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from minilora import backend
from minilora.backend import xp
from minilora.config import ConfigError, JsonConfig, check_int, option
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
from minilora.model import GPT
from minilora.nn.kv_cache import KVCache
from minilora.nn.layers import Module

PROMPT_INITS = ("vocab", "random")


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

    prompt_len: int = option(16, "soft prompt vectors P", range=(1, None))
    init: str = option("vocab", "the base's embeddings of random tokens, or random",
                       choices=PROMPT_INITS)
    seed: int = option(0, "seed of the initialisation", cli=False)

    def __post_init__(self):
        check_int("prompt_len", self.prompt_len)
        if self.init not in PROMPT_INITS:
            raise ConfigError(f"prompt init must be one of {list(PROMPT_INITS)}; got {self.init!r}")
        check_int("seed", self.seed, lo=0)

class PromptTuningModel(GPTWrapper):
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
        check_gpt(gpt, "PromptTuningModel")
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
        """idx (B, T) with P + T <= block_size -> logits (B, T, V), cache: the GPT's parts
        composed from outside (token embeddings, the prompt in front, the positions of all
        P + T inputs, the stack), the logits of the T real tokens kept."""
        if check:
            self.check_input(idx)
        gpt, P = self.gpt, self.prompt_len
        w = self.children["prompt"].params["weight"]
        tok, c_tok = gpt.wte.forward(idx)  # (B, T, C)
        x = xp.concatenate([xp.broadcast_to(w, (idx.shape[0], *w.shape)).astype(tok.dtype),
                            tok], axis=1)  # (B, P + T, C)
        x, c_pos = gpt.add_positions(x)
        logits, c_stack = gpt.stack(x)
        return logits[:, P:], (c_tok, c_pos, c_stack)

    def backward(self, dlogits, cache):
        """forward: logits = full[:, P:]  ->  dfull = [0; dlogits];
        forward: x[:, :P] = broadcast(prompt, B)  ->  dprompt = sum over b of dx[b, :P]."""
        c_tok, c_pos, c_stack = cache
        B, T, V = dlogits.shape
        P = self.prompt_len
        dfull = xp.zeros((B, P + T, V), dtype=dlogits.dtype)
        dfull[:, P:] = dlogits
        dx = self.gpt.stack_backward(dfull, c_stack, need_dx=True)
        self.gpt.add_positions_backward(dx, c_pos)
        prompt = self.children["prompt"]
        if prompt.needs_grad("weight"):
            prompt._accumulate("weight", dx[:, :P].sum(axis=0))
        if self.gpt.wte.trainable:
            self.gpt.wte.backward(dx[:, P:], c_tok)
        return {}

    def kv_cache(self, batch_size: int, keep: int | None = None) -> KVCache:
        """A generation cache whose first P slots (never re-encoded) hold the keys and values
        every layer computes for the soft prompt at positions 0 .. P-1; the tokens follow from
        position P on."""
        P = self.prompt_len
        w = self.children["prompt"].params["weight"]
        x = w[None] + self.gpt.wpe.params["weight"][None, :P]  # (1, P, C)
        key, value = layer_keys_values(self.gpt, x)
        kv = self.gpt.kv_cache(batch_size, keep, n_fixed=P, first_position=P)
        kv.set_fixed(key, value)
        return kv


def add_prompt(gpt, config: PromptConfig) -> PromptTuningModel:
    """Freeze ``gpt`` and return it wrapped with a trainable soft prompt (:class:`PromptConfig`).

    Chapter: chapters/04-lora-notes.ipynb
    """
    if not isinstance(config, PromptConfig):
        raise TypeError(f"config must be a PromptConfig, got {type(config).__name__}")
    check_gpt(gpt, "prompt tuning")
    P, T = config.prompt_len, gpt.config.block_size
    if P >= T:
        raise ConfigError(f"prompt_len={P} must be < the base's block_size {T} (the prompt and "
                          f"the tokens share the {T} positions)")
    rng = backend.cpu_rng(config.seed)
    wte = gpt.wte.params["weight"]
    if config.init == "vocab":
        prompt = wte[random_token_ids(gpt, P, rng)[0]]  # (P, C), a copy
    else:
        std = float(backend.to_scalar(wte.std()))
        prompt = backend.asarray(rng.standard_normal((P, wte.shape[1])) * std, dtype=wte.dtype)
    model = PromptTuningModel(gpt, xp.ascontiguousarray(prompt))
    model.set_trainable(lambda name: name.startswith("prompt."))
    return model


class PromptMethod(Method):
    """Prompt tuning: P trainable soft-prompt vectors before the tokens (a wrapper model)."""

    name = "prompt"
    example = "--prompt-len 16"
    config_cls = PromptConfig
    summary = "prompt tuning: P trained soft-prompt vectors before the tokens"
    weights_file = "prompt.safetensors"
    file_format = METHOD_FILE_FORMAT
    lr = (1e-1, 1e-2)
    base_differs = "wrapped"
    file_names = ("prompt",)

    def _apply(self, model, config) -> Tuned:
        return Tuned(add_prompt(model, config), config, self)

    def count_parameters(self, config, model_config) -> int:
        """P C."""
        return config.prompt_len * model_config.n_embd

    def save(self, path, tuned: Tuned, tokenizer=None) -> None:
        save_tensors_file(path, self.file_format, tuned, self.trainable(tuned),
                          {"method": self.name, "config": tuned.config.to_dict()})

    def load(self, path, model) -> Tuned:
        config, arrays, saved, paths = read_tensors_file(
            path, self.file_format, "prompt file", model, "config", self.config_cls)
        tuned = self.apply(model, config)
        copy_in(tuned.model, arrays, self.trainable(tuned), str(path), saved, paths)
        return tuned._replace(modules_to_save=tuple(paths))


PROMPT = PromptMethod()
