"""The KV cache: decoding token by token with cached keys and values gives the logits of a full
forward pass over the context, at every position, in float64 to 1e-12, for the base model and
every way of running an adapter; past the window, the documented re-encoding definition.

The reference never touches the cache: ``model.forward`` on the whole context (cropped as
:class:`minilora.model.KVCache` documents), last positions taken.
"""
import numpy as np
import pytest
from helpers import np_

from minilora import backend
from minilora.adapters import AdapterRegistry, generate_mixed
from minilora.config import GPTConfig, QuantConfig
from minilora.methods.lora.config import LoraConfig
from minilora.data import CharTokenizer
from minilora.methods.lora import inject_lora, lora_state_dict, merge_lora
from minilora.model import GPT
from minilora.nn.kv_cache import KVCache, KVCacheError
from minilora.methods.houlsby import HoulsbyConfig, inject_houlsby
from minilora.methods.prefix import PrefixConfig, add_prefix
from minilora.methods.prompt import PromptConfig, add_prompt
from minilora.methods.qlora import inject_qlora
from minilora.sample import generate

TINY = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8, init_std=0.3)
TOL = 1e-12


def tiny(seed=0, config=TINY, dtype="float64"):
    return GPT(config, seed, dtype=dtype)


def stream(B=3, n=7, seed=0, V=11):
    return backend.asarray(np.random.default_rng(seed).integers(0, V, size=(B, n)))


def cached_logits(model, ids, prompt_len, keep=None, kv=None):
    """Feed ``ids[:, :prompt_len]`` as one chunk, then one token per call; all the logits."""
    kv = kv or model.kv_cache(ids.shape[0], keep)
    out = [model.forward_incremental(ids[:, :prompt_len], kv)]
    for t in range(prompt_len, ids.shape[1]):
        out.append(model.forward_incremental(ids[:, t:t + 1], kv))
    return np_(backend.xp.concatenate(out, axis=1)), kv


def recomputed_logits(forward, ids, prompt_len, window, keep=None):
    """The definition, by full forward passes: a chunk that does not fit restarts the context
    from the last min(keep, window - T) tokens before it (keep = window - 1 by default)."""
    keep = window - 1 if keep is None else keep
    chunks = [(0, prompt_len)] + [(t, t + 1) for t in range(prompt_len, ids.shape[1])]
    start, out = 0, []
    for a, b in chunks:
        n, T = a - start, b - a
        if n + T > window:
            start = a - min(keep, window - T, n)
        out.append(np_(forward(ids[:, start:b]))[:, -T:])
    return np.concatenate(out, axis=1)


def full(model):
    return lambda ids: model.forward(ids)[0]


def assert_cached_equals_full(model, ids, prompt_len=3):
    got, kv = cached_logits(model, ids, prompt_len)
    ref = recomputed_logits(full(model), ids, prompt_len, kv.window)
    assert got.shape == ref.shape == (ids.shape[0], ids.shape[1], 11)
    np.testing.assert_allclose(got, ref, rtol=0, atol=TOL)
    return kv


# ----------------------------------------------------------------------------------------------
# within the window: every model kind
# ----------------------------------------------------------------------------------------------
def test_base_cached_equals_full_forward_at_every_position(xpb):
    kv = assert_cached_equals_full(tiny(), stream(n=8))  # fills the window exactly
    assert kv.reencodings == 0 and kv.n_tokens == 8 and kv.next_position == 8


def test_chunks_of_any_length_give_the_same_logits():
    model, ids = tiny(), stream(n=8)
    kv = model.kv_cache(3)
    parts = [model.forward_incremental(ids[:, a:b], kv) for a, b in ((0, 1), (1, 4), (4, 8))]
    ref = np_(model.forward(ids)[0])  # one causal pass: position t sees 0..t
    np.testing.assert_allclose(np.concatenate([np_(p) for p in parts], axis=1), ref, atol=TOL)


def test_unmerged_lora_on_every_target():
    model = tiny()
    inject_lora(model, LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, seed=3,
                                  target_modules=("q", "k", "v", "o", "up", "down", "wte",
                                                  "lm_head")))
    assert_cached_equals_full(model, stream(n=8))


def test_merged_lora():
    model = tiny()
    inject_lora(model, LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, seed=3,
                                  target_modules=("q", "v", "wte")))
    merge_lora(model)
    assert_cached_equals_full(model, stream(n=8))


def test_qlora():
    model = tiny(dtype="float32")
    inject_qlora(model, LoraConfig(r=2, lora_alpha=4, init_lora_weights=False,
                                   target_modules=("q", "v", "up")), QuantConfig(blocksize=16))
    model.astype("float64")  # the 4-bit codes stay; A, B, biases and the dequantised W0 in float64
    assert_cached_equals_full(model, stream(n=8))


def test_adalora_and_generation_with_it():
    from minilora.methods.adalora import ADALORA, AdaLoraConfig, adalora_layers
    from minilora.sample import generate
    model = ADALORA.apply(tiny(), AdaLoraConfig(init_r=3, target_r=2, target_modules=("q", "v"),
                                                total_step=10)).model
    rng = np.random.default_rng(4)
    for m in adalora_layers(model).values():  # E = 0 at init: make the adapter do something
        m.params["lora_E"] = backend.asarray(rng.standard_normal(m.params["lora_E"].shape))
    assert_cached_equals_full(model, stream(n=8))
    ids = stream(n=3)
    a = generate(model, ids, 4, rng=np.random.default_rng(0), use_cache=True)
    b = generate(model, ids, 4, rng=np.random.default_rng(0), use_cache=False)
    np.testing.assert_array_equal(np_(a), np_(b))


def test_houlsby_adapters():
    model = tiny()
    inject_houlsby(model, HoulsbyConfig(bottleneck=3, zero_up=False, init_std=0.3, seed=1))
    assert_cached_equals_full(model, stream(n=8))


def test_prefix_tuning_prefix_is_the_first_entries_of_the_cache(xpb):
    model = add_prefix(tiny(), PrefixConfig(prefix_len=3, init="random", init_std=0.5, seed=2))
    kv = assert_cached_equals_full(model, stream(n=8))
    assert kv.n_fixed == 3 and kv.window == 8 and kv.length == 3 + 8
    key = np_(model.children["prefix"].params["key"])  # (L, P, C)
    for b in range(3):
        np.testing.assert_array_equal(np_(kv.keys[:, b, :3]), key)


def test_prompt_tuning_soft_prompt_takes_the_first_positions():
    model = add_prompt(tiny(), PromptConfig(prompt_len=3, init="random", seed=2))
    kv = assert_cached_equals_full(model, stream(n=5))  # 3 prompt + 5 tokens = block_size
    assert kv.n_fixed == 3 and kv.first_position == 3 and kv.window == 5


def test_mixed_adapter_batch_against_the_registry_full_forward():
    cfg = LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, target_modules=("q", "v", "wte"))
    reg = AdapterRegistry(tiny())
    for name, seed in (("a", 1), ("b", 2)):
        m = tiny()
        inject_lora(m, LoraConfig(**{**cfg.to_dict(), "seed": seed}))
        reg.add(name, {k: np_(v).copy() for k, v in lora_state_dict(m).items()}, cfg)
    ids = ["b", None, "a", "b"]  # rows out of adapter order: the cache keeps them grouped
    view = reg.view(ids)
    toks = stream(B=4, n=8)
    got, kv = cached_logits(view, toks, 3)
    ref = recomputed_logits(lambda x: reg.forward(x, ids), toks, 3, kv.window)
    np.testing.assert_allclose(got, ref, rtol=0, atol=TOL)
    assert not np.allclose(ref[0], ref[1])  # the adapters really differ per row


# ----------------------------------------------------------------------------------------------
# past the window
# ----------------------------------------------------------------------------------------------
def test_past_the_window_default_is_the_cropped_context_recompute():
    """keep = window - 1: each token is predicted from exactly the last block_size tokens, the
    plain definition (model.forward on the context cropped to block_size)."""
    model, ids = tiny(), stream(n=20)
    got, kv = cached_logits(model, ids, 3)
    ref = np.stack([np_(model.forward(ids[:, max(0, t - 7):t + 1])[0])[:, -1]
                    for t in range(20)], axis=1)
    np.testing.assert_allclose(got, ref, rtol=0, atol=TOL)
    assert kv.reencodings == 12  # one per token past the 8th


@pytest.mark.parametrize("keep", [0, 2, 4])
def test_past_the_window_with_a_shorter_keep(keep):
    model, ids = tiny(), stream(n=21)
    got, kv = cached_logits(model, ids, 5, keep=keep)
    np.testing.assert_allclose(got, recomputed_logits(full(model), ids, 5, 8, keep),
                               rtol=0, atol=TOL)
    assert kv.reencodings == len(range(8, 21, 8 - keep))  # one every window - keep tokens


def test_past_the_window_keeps_the_prefix_and_the_soft_prompt():
    for model in (add_prefix(tiny(), PrefixConfig(prefix_len=2, init="random", seed=2)),
                  add_prompt(tiny(), PromptConfig(prompt_len=3, init="random", seed=2))):
        ids = stream(n=15)
        for keep in (None, 2):
            got, kv = cached_logits(model, ids, 3, keep=keep)
            np.testing.assert_allclose(
                got, recomputed_logits(full(model), ids, 3, kv.window, keep), rtol=0, atol=TOL)
            assert kv.reencodings > 0


# ----------------------------------------------------------------------------------------------
# generation
# ----------------------------------------------------------------------------------------------
def test_generate_with_and_without_cache_draw_the_same_tokens(xpb):
    """The exact window past block_size too: the cache computes the plain definition's logits,
    so the same uniforms draw the same ids (float64: differences ~1e-15 cannot flip a draw
    here). It is what generation computed before the chunked window became the default."""
    model = tiny()
    idx = stream(B=2, n=3)
    a = generate(model, idx, 20, temperature=1.0, rng=5, exact_window=True)
    b = generate(model, idx, 20, temperature=1.0, rng=5, use_cache=False)
    c = generate(model, idx, 20, temperature=1.0, rng=5, keep=TINY.block_size - 1)
    assert a.shape == (2, 23)
    np.testing.assert_array_equal(np_(a), np_(b))
    np.testing.assert_array_equal(np_(a), np_(c))


def test_chunked_window_is_the_exact_one_inside_the_context_and_its_own_definition_past_it():
    """The default (chunked window): inside block_size the exact window's tokens; past it, each
    token drawn from the model run on its chunked context (the last half window re-encoded
    whenever the window is full), which differs from the exact window's."""
    model = tiny()
    idx = stream(B=2, n=3)
    inside = TINY.block_size - 3
    np.testing.assert_array_equal(np_(generate(model, idx, inside, temperature=1.0, rng=5)),
                                  np_(generate(model, idx, inside, temperature=1.0, rng=5,
                                               exact_window=True)))
    got = np_(generate(model, idx, 30, temperature=1.0, rng=5))
    exact = np_(generate(model, idx, 30, temperature=1.0, rng=5, exact_window=True))
    assert (got != exact).any()  # an approximation past the window, as documented
    ids = backend.asarray(got)
    logits, kv = cached_logits(model, ids, 3, keep="half")
    ref = recomputed_logits(full(model), ids, 3, 8, keep=4)
    np.testing.assert_allclose(logits, ref, rtol=0, atol=TOL)
    assert kv.keep == 4 and kv.reencodings == len(range(8, 33, 4))


def test_generate_streams_each_token_as_it_is_drawn():
    model = tiny()
    seen = []
    out = generate(model, stream(B=2, n=3), 12, rng=2, on_token=lambda ids: seen.append(ids.copy()))
    assert np.array_equal(np.stack(seen, axis=1), np_(out)[:, 3:])


def test_generate_mixed_with_and_without_cache():
    tok = CharTokenizer.default()
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=16)
    lcfg = LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, target_modules=("q", "v"))
    m = GPT(cfg, 0, dtype="float64")
    inject_lora(m, lcfg)
    reg = AdapterRegistry(GPT(cfg, 0, dtype="float64"))
    reg.add("a", {k: np_(v).copy() for k, v in lora_state_dict(m).items()}, lcfg)
    kw = dict(max_new_tokens=24, temperature=1.0, seed=3)  # crosses block_size 16
    assert (generate_mixed(reg, tok, "ROMEO:", ["a", None], exact_window=True, **kw)
            == generate_mixed(reg, tok, "ROMEO:", ["a", None], use_cache=False, **kw))


def test_long_prompt_is_cropped_to_the_window():
    model = tiny()
    idx = stream(B=1, n=30)
    a = generate(model, idx, 3, rng=1, exact_window=True)
    b = generate(model, idx, 3, rng=1, use_cache=False)
    np.testing.assert_array_equal(np_(a), np_(b))
    assert np_(a)[0, :30].tolist() == np_(idx)[0].tolist()


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------
def test_cache_misuse_is_a_clear_error():
    model = tiny()
    kv = model.kv_cache(2)
    with pytest.raises(KVCacheError, match="holds 2 sequences, got a batch of 3"):
        model.forward_incremental(stream(B=3, n=2), kv)
    with pytest.raises(KVCacheError, match="longer than the cache's window 8"):
        KVCache(2, 1, 8, 8, "float64").check_chunk(stream(B=1, n=9))
    with pytest.raises(KVCacheError, match="keep .* 'half' or an integer in \\[0, 7\\]"):
        model.kv_cache(1, keep=8)
    logits = model.forward_incremental(stream(B=2, n=3), kv)
    assert logits.shape == (2, 3, 11)
    with pytest.raises(KVCacheError, match="already holds entries"):
        kv.set_fixed(kv.keys[:, 0, :0], kv.values[:, 0, :0])


def test_no_gradient_through_a_generation_cache():
    model = tiny()
    kv = model.kv_cache(1)
    logits, cache = model.forward(stream(B=1, n=3), past_kv=kv.layers)
    with pytest.raises(KVCacheError, match="generation only and has no gradient"):
        model.backward(backend.xp.ones_like(logits), cache)


def test_the_torch_reference_cache_gives_our_logits():
    """The bench's PyTorch decode (its hand-written KV cache) computes what ours does."""
    torch = pytest.importorskip("torch")
    from minilora.bench.torch_reference import reference
    tg = reference(torch)
    cfg = GPTConfig(vocab_size=11, block_size=16, n_layer=2, n_head=2, n_embd=8, init_std=0.3)
    model = tiny(config=cfg)
    ids = np.random.default_rng(0).integers(0, 11, size=(3, 16))
    ours, _ = cached_logits(model, backend.asarray(ids), 4)
    for sdpa in (False, True):
        tmodel = tg.from_minilora(model, use_sdpa=sdpa)
        kv = tg.KVCache(tmodel, 3)
        with torch.no_grad():
            parts = [tmodel(torch.from_numpy(ids[:, :4]), kv)]
            parts += [tmodel(torch.from_numpy(ids[:, t:t + 1]), kv) for t in range(4, 16)]
        np.testing.assert_allclose(torch.cat(parts, 1).numpy(), ours, rtol=0, atol=1e-12)
