"""Paged AdamW: same numbers as AdamW, page accounting by hand, LRU order, clear errors, CuPy."""
import json

import numpy as np
import pytest
from conftest import CUPY

from minilora import backend
from minilora.config import GPTConfig
from minilora.experiments.studies.paged_demo import paged_demo
from minilora.model import GPT
from minilora.optim import AdamW
from minilora.paged import DeviceMemory, DeviceOutOfMemory, PagedAdamW

KiB = 1024


def _tiny(dtype="float64", seed=0):
    cfg = GPTConfig(block_size=16, vocab_size=11, n_layer=2, n_head=2, n_embd=8)
    return GPT(cfg, rng=seed, dtype=dtype)


def _train(opt_factory, dtype="float64", steps=5, freeze_some=False):
    model = _tiny(dtype)
    if freeze_some:  # a trainable set that changes between steps exercises the lazy state
        model.set_trainable(lambda n: not n.startswith("blocks.1"))
    opt = opt_factory(model)
    rng = np.random.default_rng(7)
    losses = []
    for step in range(steps):
        if freeze_some and step == 2:
            model.set_trainable(lambda n: True)
        x = backend.asarray(rng.integers(0, 11, size=(3, 16)))
        y = backend.asarray(rng.integers(0, 11, size=(3, 16)))
        losses.append(model.forward_backward(x, y))
        opt.step(lr=1e-2, grad_clip=1.0)
    return model, opt, losses


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("freeze_some", [False, True])
@pytest.mark.parametrize("simulate", [True, False])
def test_paged_equals_adamw_bit_exact(dtype, freeze_some, simulate):
    ref_model, ref_opt, ref_losses = _train(lambda m: AdamW(m, lr=1e-2), dtype,
                                            freeze_some=freeze_some)
    # a budget so tight that state pages go out and in during every step
    dev = DeviceMemory(budget_bytes=2 * KiB, page_bytes=KiB) if simulate else None
    model, opt, losses = _train(lambda m: PagedAdamW(m, lr=1e-2, device=dev), dtype,
                                freeze_some=freeze_some)
    if simulate:
        assert dev.page_outs > 0 and dev.page_ins > 0  # paging really happened
    assert losses == ref_losses
    for (n, p), (n2, p2) in zip(ref_model.named_parameters(), model.named_parameters()):
        assert n == n2 and np.array_equal(p, p2), n
    ref_state, state = ref_opt.state_arrays(), opt.state_arrays()
    assert ref_state.keys() == state.keys()
    for k in ref_state:
        assert np.array_equal(ref_state[k], state[k]), k
    if freeze_some:
        assert len(opt.arenas) == 2  # the later-unfrozen parameters got a second arena


def test_state_lives_in_the_arena_with_m_and_v_side_by_side():
    model = _tiny()
    opt = PagedAdamW(model, device=DeviceMemory(1 << 20, page_bytes=4 * KiB))
    model.forward_backward(backend.asarray(np.zeros((1, 4), dtype=np.int64)),
                           backend.asarray(np.zeros((1, 4), dtype=np.int64)))
    opt.step()
    (arena, region), = opt.arenas
    assert arena.nbytes % (4 * KiB) == 0 and opt.paged_bytes() >= opt.state_bytes()
    for name, _, _ in model.named_trainable():
        assert opt.m[name].base is not None and np.shares_memory(opt.m[name], arena)
        k, off, span = opt._slot[name]
        m_off = opt.m[name].__array_interface__["data"][0] - arena.__array_interface__["data"][0]
        v_off = opt.v[name].__array_interface__["data"][0] - arena.__array_interface__["data"][0]
        assert m_off == off and m_off % 256 == 0 and v_off % 256 == 0
        assert v_off + opt.v[name].nbytes == off + span


def test_page_accounting_matches_hand_count():
    # budget 10 pages of 100 bytes; one region of 6 pages
    dev = DeviceMemory(1000, page_bytes=100, bandwidth_bytes_per_s=1000.0)
    dev.allocate("weights", 300)
    r = dev.new_region(550)  # rounds up to 6 pages
    assert dev.region_pages(r) == 6
    dev.touch(r, 0, 550)  # 6 first touches, no transfer: 300 + 600 = 900 <= 1000
    c = dev.counters()
    assert (c["first_touches"], c["page_ins"], c["page_outs"], c["bytes_in"]) == (6, 0, 0, 0)
    assert c["used_bytes"] == 900
    dev.allocate("activations", 350)  # 300 + 350 + 600 = 1250 > 1000: evict 3 pages (LRU 0,1,2)
    c = dev.counters()
    assert (c["page_outs"], c["bytes_out"], c["resident_bytes"], c["host_bytes"]) == (3, 300, 300, 300)
    assert dev.resident_pages() == [(r, 3), (r, 4), (r, 5)]
    assert c["used_bytes"] == 950 and c["peak_bytes"] == 950
    dev.free("activations")
    dev.touch(r, 150, 420)  # pages 1..4: 1, 2 come back in; 3, 4 already there
    c = dev.counters()
    assert (c["page_ins"], c["bytes_in"], c["page_outs"]) == (2, 200, 3)
    assert c["modelled_s"] == pytest.approx((200 + 300) / 1000.0)
    assert dev.resident_pages() == [(r, 5), (r, 1), (r, 2), (r, 3), (r, 4)]  # LRU first


def test_eviction_is_least_recently_used():
    dev = DeviceMemory(4 * 64, page_bytes=64)  # 4 pages
    a, b = dev.new_region(2 * 64), dev.new_region(2 * 64)
    dev.touch(a, 0, 128)
    dev.touch(b, 0, 128)
    dev.touch(a, 0, 1)  # a's page 0 is now the most recently used
    dev.allocate("spike", 2 * 64)  # two pages must go: a1 (oldest), then b0
    assert dev.resident_pages() == [(b, 1), (a, 0)]
    assert dev.page_outs == 2
    dev.free("spike")
    dev.touch(a, 64, 128)  # a1 pages back in without evicting (there is room)
    assert dev.page_ins == 1 and dev.page_outs == 2


def test_thrashing_when_one_range_is_larger_than_free_memory():
    dev = DeviceMemory(3 * 10, page_bytes=10)
    dev.allocate("w", 10)  # room for 2 pages
    r = dev.new_region(40)
    dev.touch(r, 0, 40)  # pages 0,1 first-touched; 2 evicts 0; 3 evicts 1
    assert (dev.first_touches, dev.page_outs, dev.page_ins) == (4, 2, 0)
    dev.touch(r, 0, 40)  # 0 in (evict 2), 1 in (evict 3), 2 in (evict 0), 3 in (evict 1)
    assert (dev.page_ins, dev.page_outs) == (4, 6)
    assert dev.used_bytes <= dev.budget_bytes


def test_page_out_hint_and_free_region():
    dev = DeviceMemory(1000, page_bytes=100)
    r = dev.new_region(300)
    dev.touch(r, 0, 300)
    assert dev.page_out() == 3 and dev.host_bytes == 300 and dev.resident_bytes == 0
    dev.free_region(r)
    assert dev.host_bytes == 0
    with pytest.raises(ValueError, match="no managed region"):
        dev.touch(r, 0, 1)


@pytest.mark.parametrize("budget, page, match", [
    (100, 200, "smaller than one page"),
    (-5, 100, "budget_bytes must be >= 0"),
    (0, 100, "smaller than one page"),
    (1000, 0, "page_bytes must be >= 1"),
    (1000, 1.5, "whole number"),
    (1000, True, "whole number"),
])
def test_bad_budget_or_page_is_one_clear_error(budget, page, match):
    with pytest.raises(ValueError, match=match):
        DeviceMemory(budget, page_bytes=page)


def test_bad_bandwidth_and_ranges_are_clear_errors():
    with pytest.raises(ValueError, match="bandwidth"):
        DeviceMemory(1000, 100, bandwidth_bytes_per_s=0)
    dev = DeviceMemory(1000, 100)
    r = dev.new_region(150)
    with pytest.raises(ValueError, match=r"outside region"):
        dev.touch(r, 100, 201)
    with pytest.raises(ValueError, match="no allocation named 'x'"):
        dev.free("x")
    dev.allocate("x", 1)
    with pytest.raises(ValueError, match="exists already"):
        dev.allocate("x", 1)
    with pytest.raises(TypeError, match="DeviceMemory"):
        PagedAdamW(_tiny(), device=1000)


def test_out_of_memory_when_paging_cannot_help():
    dev = DeviceMemory(1000, page_bytes=100)
    r = dev.new_region(300)
    dev.touch(r, 0, 300)
    with pytest.raises(DeviceOutOfMemory, match="even with a paged optimizer"):
        dev.allocate("activations", 1001)
    assert dev.resident_bytes == 300 and dev.page_outs == 0  # nothing changed
    dev.allocate("activations", 950)  # fits once all state is out
    assert dev.page_outs == 3
    with pytest.raises(DeviceOutOfMemory, match="less than one page"):
        dev.touch(r, 0, 1)


def test_load_state_moves_loaded_moments_into_an_arena():
    _, ref_opt, _ = _train(lambda m: AdamW(m, lr=1e-2), steps=2)
    model = _tiny()
    opt = PagedAdamW(model, lr=1e-2, device=DeviceMemory(1 << 20, page_bytes=KiB))
    opt.load_state(ref_opt.state_arrays(), ref_opt.state_meta())
    assert len(opt.arenas) == 1
    for k, a in ref_opt.state_arrays().items():
        name, kind = k.rsplit(".", 1)
        b = (opt.m if kind == "m" else opt.v)[name]
        assert np.array_equal(a, b) and np.shares_memory(b, opt.arenas[0][0])


def test_demo_writes_trace_with_a_spike_that_pages(tmp_path):
    out = tmp_path / "trace.json"
    r = paged_demo(out=out, steps=4, spike_steps=(2,), batch_size=1, block_size=16,
                   spike_block_size=48, page_bytes=256 * KiB, log=lambda s: None)
    saved = json.loads(out.read_text())
    assert saved["losses_identical"] and r["losses_identical"]
    tight = saved["runs"]["tight"]["steps"]
    extra = saved["sizes"]["activation_bytes_spike"] - saved["sizes"]["activation_bytes_normal"]
    pages = -(-extra // (256 * KiB))
    assert [s["page_outs"] for s in tight] == [0, 0, pages, 0]
    assert [s["page_ins"] for s in tight] == [0, 0, pages, 0]
    assert all(s["page_outs"] == s["page_ins"] == 0 for s in saved["runs"]["roomy"]["steps"])
    assert tight[2]["demand_without_paging_bytes"] > saved["runs"]["tight"]["budget_bytes"]


def test_demo_rejects_a_spike_paging_cannot_absorb():
    with pytest.raises(ValueError, match="cannot absorb"):
        paged_demo(out=None, steps=2, spike_steps=(1,), batch_size=8, block_size=64,
                   spike_block_size=256, log=lambda s: None)


@pytest.mark.skipif(not CUPY, reason="CuPy with a usable GPU is not available")
def test_cupy_state_is_managed_memory_and_matches_numpy():
    def run():
        model, opt, losses = _train(lambda m: PagedAdamW(m, lr=1e-2), "float64", steps=3)
        opt.page_out()  # CuPy: prefetch everything to the host; the next update pages it back
        opt.step(lr=1e-2)
        return model, opt, losses

    ref_model, _, ref_losses = run()
    backend.set_backend("cupy")
    try:
        buf = backend.managed_zeros(4096)
        assert backend.is_managed(buf) and int(buf.sum()) == 0
        reason = backend.prefetch(buf)
        assert reason is None or "cudaMemPrefetchAsync" in reason
        model, opt, losses = run()
        assert all(backend.is_managed(a) for a, _ in opt.arenas)
        # float64, same ops: agreement to rounding (cuBLAS may sum in another order)
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-10)
        for (n, p), (_, q) in zip(ref_model.named_parameters(), model.named_parameters()):
            np.testing.assert_allclose(backend.to_numpy(q), p, rtol=1e-8, atol=1e-12, err_msg=n)
    finally:
        backend.set_backend("numpy")


def test_cli_paged_demo_and_its_figure(tmp_path, capsys):
    from minilora.cli import main
    from minilora.experiments.figures import make_figures

    res = tmp_path / "results"
    out = res / "paged" / "trace.json"
    rc = main(["paged-demo", "--steps", "3", "--spike-steps", "1", "--batch-size", "1",
               "--block-size", "16", "--spike-block-size", "48", "--page-kib", "256",
               "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and out.exists()
    assert "losses identical with and without paging: True" in text and "tight: budget" in text
    done = make_figures(["paged"], res, tmp_path / "fig", log=lambda s: None)
    png = tmp_path / "fig" / "paged_trace.png"
    assert done["paged"] == [str(png)] and png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("argv, match", [
    (["--spike-steps", "x"], "--spike-steps must be"),
    (["--steps", "3", "--spike-steps", "5"], "--spike-steps [5] lie beyond the run"),
    (["--budget-mb", "1"], "cannot absorb it"),
    (["--page-kib", "0"], "--page-kib must be > 0"),
])
def test_cli_paged_demo_bad_input_is_one_line(argv, match, capsys):
    from minilora.cli import main

    try:
        rc = main(["paged-demo", "--out", "", "--block-size", "16", "--spike-block-size", "32"]
                  + argv)
    except SystemExit as e:  # a flag refused by the parser (its type= check)
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and match in err and "Traceback" not in err
