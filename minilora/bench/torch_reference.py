"""The PyTorch reference for minilora's GPT: same architecture, same parameter names, same step.

minilora itself never imports PyTorch. The bench (and ``tests/test_torch_xcheck.py``) imports it
when it is installed and passes the module in::

    tg = reference(torch)                            # the classes, built on that torch
    tmodel = tg.from_minilora(model)                 # same weights, copied by name
    opt = tg.make_optimizer(tmodel, lr=1e-3)         # AdamW (0.9, 0.99), eps 1e-8, wd 0.1 on 2-D
    loss = tg.train_step(tmodel, opt, x, y)          # zero_grad, forward, CE, backward, clip, step
    out = tg.generate(tmodel, idx, 200)              # sampling with a KV cache written by hand

The work matches ours op for op: separate q, k, v, o projections with biases, attention computed
explicitly (``q @ k^T / sqrt(hs)`` + causal mask, softmax, ``@ v``) over the full T x T square,
GELU with the tanh approximation, untied ``lm_head`` without bias. ``use_sdpa=True`` swaps the
explicit attention for ``F.scaled_dot_product_attention`` (a fused kernel: timed separately,
since it does less work than ours).

Generation: ``TorchGPT.forward(idx, kv)`` with a :class:`KVCache` (keys and values (L, B, S, C)
preallocated to ``block_size``, as ours) encodes only the new tokens, each layer attending over
the cached keys plus its own; ``generate`` samples with it (or, ``use_cache=False``, re-runs the
whole context). It stays within ``block_size`` (the bench's generations do).
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np

from minilora.backend import to_numpy


def reference(torch) -> SimpleNamespace:
    """Build the reference on the given ``torch`` module; returns a namespace with
    ``TorchGPT``, ``KVCache``, ``from_minilora``, ``make_optimizer``, ``train_step`` and
    ``generate``."""
    nn, F = torch.nn, torch.nn.functional

    class CausalSelfAttention(nn.Module):
        def __init__(self, n_embd: int, n_head: int, block_size: int, bias: bool, use_sdpa: bool):
            super().__init__()
            self.q = nn.Linear(n_embd, n_embd, bias=bias)
            self.k = nn.Linear(n_embd, n_embd, bias=bias)
            self.v = nn.Linear(n_embd, n_embd, bias=bias)
            self.o = nn.Linear(n_embd, n_embd, bias=bias)
            self.n_head = n_head
            self.use_sdpa = use_sdpa
            # additive (T, T) mask: 0 where query t may see key j (j <= t), -inf elsewhere (as ours)
            allowed = torch.tril(torch.ones(block_size, block_size, dtype=torch.bool))
            self.register_buffer("mask_bias", torch.zeros(block_size, block_size).masked_fill(
                ~allowed, float("-inf")), persistent=False)

        def forward(self, x, kv=None, layer: int = 0):
            """x (B, T, C); with ``kv`` the keys/values of the kv.n earlier tokens come first."""
            B, T, C = x.shape
            NH, hs = self.n_head, C // self.n_head
            k, v = self.k(x), self.v(x)  # (B, T, C)
            n = 0
            if kv is not None:  # write the new keys after the cached ones, attend over all
                n = kv.n
                kv.k[layer, :, n:n + T] = k
                kv.v[layer, :, n:n + T] = v
                k, v = kv.k[layer, :, :n + T], kv.v[layer, :, :n + T]
            Tk = n + T
            q = self.q(x).view(B, T, NH, hs).transpose(1, 2)  # (B, NH, T, hs)
            k = k.view(B, Tk, NH, hs).transpose(1, 2)  # (B, NH, Tk, hs)
            v = v.view(B, Tk, NH, hs).transpose(1, 2)
            if self.use_sdpa:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True) if n == 0 else \
                    F.scaled_dot_product_attention(
                        q, k, v, attn_mask=self.mask_bias[n:Tk, :Tk].to(q.dtype))
            else:
                att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))  # (B, NH, T, Tk)
                if T > 1:  # queries at positions n .. n+T-1 see keys 0 .. their own position
                    att = att + self.mask_bias[n:Tk, :Tk].to(att.dtype)
                att = F.softmax(att, dim=-1)
                y = att @ v  # (B, NH, T, hs)
            y = y.transpose(1, 2).contiguous().view(B, T, C)
            return self.o(y)


    class MLP(nn.Module):
        def __init__(self, n_embd: int, bias: bool):
            super().__init__()
            self.up = nn.Linear(n_embd, 4 * n_embd, bias=bias)
            self.down = nn.Linear(4 * n_embd, n_embd, bias=bias)

        def forward(self, x):
            return self.down(F.gelu(self.up(x), approximate="tanh"))


    class Block(nn.Module):
        def __init__(self, n_embd, n_head, block_size, bias, use_sdpa):
            super().__init__()
            self.ln_1 = nn.LayerNorm(n_embd, eps=1e-5)
            self.attn = CausalSelfAttention(n_embd, n_head, block_size, bias, use_sdpa)
            self.ln_2 = nn.LayerNorm(n_embd, eps=1e-5)
            self.mlp = MLP(n_embd, bias)

        def forward(self, x, kv=None, layer: int = 0):
            x = x + self.attn(self.ln_1(x), kv, layer)
            return x + self.mlp(self.ln_2(x))


    class TorchGPT(nn.Module):
        """minilora's GPT in PyTorch; ``state_dict()`` keys equal minilora's parameter names."""

        def __init__(self, vocab_size, block_size, n_layer, n_head, n_embd, bias=True,
                     use_sdpa=False):
            super().__init__()
            self.wte = nn.Embedding(vocab_size, n_embd)
            self.wpe = nn.Embedding(block_size, n_embd)
            self.blocks = nn.ModuleList(Block(n_embd, n_head, block_size, bias, use_sdpa)
                                        for _ in range(n_layer))
            self.ln_f = nn.LayerNorm(n_embd, eps=1e-5)
            self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)

        def forward(self, idx, kv=None):
            """idx (B, T) -> logits (B, T, V); with ``kv`` (a :class:`KVCache`) idx are the
            new tokens after the kv.n cached ones, and their keys/values are appended."""
            T = idx.shape[1]
            n = 0 if kv is None else kv.n
            pos = torch.arange(n, n + T, device=idx.device)
            x = self.wte(idx) + self.wpe(pos)[None]  # (B, T, C)
            for i, blk in enumerate(self.blocks):
                x = blk(x, kv, i)
            if kv is not None:
                kv.n += T
            return self.lm_head(self.ln_f(x))  # (B, T, V)


    class KVCache:
        """Keys and values of every layer, (L, B, block_size, C) each, filled up to ``n``."""

        def __init__(self, tmodel, batch_size: int):
            L, S = len(tmodel.blocks), tmodel.wpe.weight.shape[0]
            C, dtype = tmodel.wpe.weight.shape[1], tmodel.wpe.weight.dtype
            self.k = torch.zeros(L, batch_size, S, C, dtype=dtype)
            self.v = torch.zeros(L, batch_size, S, C, dtype=dtype)
            self.n = 0


    def from_minilora(model, use_sdpa: bool = False) -> TorchGPT:
        """A :class:`TorchGPT` holding a copy of a minilora GPT's weights (same dtype), by name."""
        c = model.config
        tmodel = TorchGPT(c.vocab_size, c.block_size, c.n_layer, c.n_head, c.n_embd, c.bias, use_sdpa)
        ours = {n: np.array(to_numpy(p)) for n, p in model.named_parameters()}  # copies
        dtype = torch.from_numpy(next(iter(ours.values()))).dtype
        tmodel.to(dtype)
        theirs = dict(tmodel.named_parameters())
        if set(ours) != set(theirs):
            raise ValueError(f"parameter names differ: only minilora "
                             f"{sorted(set(ours) - set(theirs))}, only torch "
                             f"{sorted(set(theirs) - set(ours))}")
        with torch.no_grad():
            for name, p in theirs.items():
                src = torch.from_numpy(ours[name])
                if tuple(src.shape) != tuple(p.shape):
                    raise ValueError(f"{name}: minilora shape {tuple(src.shape)} != "
                                     f"torch {tuple(p.shape)}")
                p.copy_(src)
        return tmodel


    def make_optimizer(tmodel, lr=1e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1):
        """AdamW with minilora's hyper-parameters; weight decay on 2-D parameters only (as ours).

        fused/foreach are left at torch's default (foreach on CPU where supported).
        """
        decay = [p for p in tmodel.parameters() if p.dim() >= 2]
        no_decay = [p for p in tmodel.parameters() if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


    def train_step(tmodel, opt, x, y, grad_clip: float = 1.0) -> float:
        """One full step: zero_grad, forward, mean cross-entropy, backward, clip, AdamW."""
        opt.zero_grad(set_to_none=True)
        logits = tmodel(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(tmodel.parameters(), grad_clip)
        opt.step()
        return loss.item()

    def generate(tmodel, idx, max_new_tokens: int, temperature: float = 1.0,
                 use_cache: bool = True, seed: int = 0):
        """Sample ``max_new_tokens`` after ``idx`` (B, T) int64; returns (B, T + new).

        softmax(logits / temperature) and one ``torch.multinomial`` draw per row and step, with
        the cache (one new token per forward) or without it (the whole context every step).
        Raises if the result would be longer than block_size (no sliding window here).
        """
        B, T0 = idx.shape
        if T0 + max_new_tokens > tmodel.wpe.weight.shape[0]:
            raise ValueError(f"{T0} + {max_new_tokens} tokens exceed block_size "
                             f"{tmodel.wpe.weight.shape[0]}: this reference does not slide")
        gen = torch.Generator().manual_seed(seed)
        out = torch.empty(B, T0 + max_new_tokens, dtype=torch.int64)
        out[:, :T0] = idx
        with torch.inference_mode():
            kv = KVCache(tmodel, B) if use_cache else None
            logits = tmodel(idx, kv)[:, -1]
            for i in range(max_new_tokens):
                p = F.softmax(logits / temperature, dim=-1)
                out[:, T0 + i] = torch.multinomial(p, 1, generator=gen)[:, 0]
                if i + 1 < max_new_tokens:
                    t = T0 + i + 1
                    logits = (tmodel(out[:, t - 1:t], kv) if use_cache
                              else tmodel(out[:, :t]))[:, -1]
        return out

    return SimpleNamespace(TorchGPT=TorchGPT, KVCache=KVCache, from_minilora=from_minilora,
                           make_optimizer=make_optimizer, train_step=train_step,
                           generate=generate)
