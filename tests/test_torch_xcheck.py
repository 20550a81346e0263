"""Our whole GPT against PyTorch autograd (optional: skipped when torch is not installed).

A tiny float64 minilora GPT and its PyTorch copy (:mod:`minilora.bench.torch_reference`, same weights by
name) must give the same logits and the same gradient of the mean cross-entropy for every
parameter; one full training step (clip + AdamW) must leave the same weights. float64 keeps the
round-off near 1e-15, so atol 1e-10 leaves five orders of magnitude for summation-order noise
while any real mistake in a backward pass (a missing term, a transposed factor) shows up at
1e-3 or more.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from minilora import backend  # noqa: E402
from minilora.bench.torch_reference import reference  # noqa: E402
from minilora.config import GPTConfig  # noqa: E402
from minilora.model import GPT  # noqa: E402
from minilora.nn import ops  # noqa: E402
from minilora.optim import AdamW  # noqa: E402

ATOL = 1e-10


tg = reference(torch)


def _tiny_pair(seed=0):
    cfg = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8)
    model = GPT(cfg, rng=seed, dtype="float64")
    # move biases and LayerNorm gains off their 0 / 1 init so that every term of every backward
    # pass is exercised
    rng = np.random.default_rng(seed + 1)
    for _, m in model.named_modules():
        for k, p in m.params.items():
            if p.ndim == 1:
                m.params[k] = p + backend.asarray(0.1 * rng.standard_normal(p.shape))
    return cfg, model, tg.from_minilora(model)


def _batch(cfg, B=3, T=7, seed=2):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, cfg.vocab_size, size=(B, T))
    y = rng.integers(0, cfg.vocab_size, size=(B, T))
    return x, y


def test_same_parameter_names_and_dtype():
    _, model, tmodel = _tiny_pair()
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in tmodel.named_parameters()]
    assert all(p.dtype == torch.float64 for p in tmodel.parameters())


def test_logits_and_every_gradient_match_autograd():
    cfg, model, tmodel = _tiny_pair()
    x, y = _batch(cfg)
    logits, cache = model.forward(backend.asarray(x))
    loss, dlogits = ops.cross_entropy(logits, backend.asarray(y))
    model.zero_grad()
    model.backward(dlogits, cache)

    tlogits = tmodel(torch.from_numpy(x))
    tloss = torch.nn.functional.cross_entropy(tlogits.reshape(-1, cfg.vocab_size),
                                              torch.from_numpy(y).reshape(-1))
    tloss.backward()

    np.testing.assert_allclose(backend.to_numpy(logits), tlogits.detach().numpy(), rtol=0,
                               atol=ATOL, err_msg="logits")
    assert abs(backend.to_scalar(loss) - tloss.item()) < ATOL, "loss"
    grads = {n: g for n, _, g in model.named_trainable()}
    for name, p in tmodel.named_parameters():
        assert grads.get(name) is not None, f"minilora has no gradient for {name}"
        np.testing.assert_allclose(backend.to_numpy(grads[name]), p.grad.numpy(), rtol=0,
                                   atol=ATOL, err_msg=f"gradient of {name}")


def test_one_training_step_matches_torch_adamw_and_clipping():
    cfg, model, tmodel = _tiny_pair(seed=3)
    x, y = _batch(cfg, seed=4)
    lr, clip = 1e-2, 0.05  # a small clip so the scaling branch runs
    opt = AdamW(model, lr=lr, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    topt = tg.make_optimizer(tmodel, lr=lr)
    for _ in range(2):  # two steps: the second one uses non-zero moments and bias correction t=2
        model.forward_backward(backend.asarray(x), backend.asarray(y))
        norm = opt.step(lr, grad_clip=clip)
        assert norm > clip
        tg.train_step(tmodel, topt, torch.from_numpy(x), torch.from_numpy(y), grad_clip=clip)
    ours = dict(model.named_parameters())
    for name, p in tmodel.named_parameters():
        np.testing.assert_allclose(backend.to_numpy(ours[name]), p.detach().numpy(), rtol=0,
                                   atol=ATOL, err_msg=f"parameter {name} after 2 AdamW steps")


def test_sdpa_variant_gives_the_same_logits():
    cfg, model, _ = _tiny_pair()
    x, _ = _batch(cfg)
    t_explicit = tg.from_minilora(model)(torch.from_numpy(x))
    t_sdpa = tg.from_minilora(model, use_sdpa=True)(torch.from_numpy(x))
    np.testing.assert_allclose(t_sdpa.detach().numpy(), t_explicit.detach().numpy(), rtol=0,
                               atol=ATOL, err_msg="logits, SDPA vs explicit attention")
