"""The thread policy (minilora.threads): the setting chosen per phase (not its speed), the
environment's overrides and their validation, and that the library puts the setting in force."""
import sys
import types

import numpy as np
import pytest
import threadpoolctl
from conftest import use_backend

from minilora import threads
from minilora.cli import main

VARS = (threads.POOL_VAR, *threads.BLAS_VARS, *threads.OTHER_VARS)


@pytest.fixture
def clean_env(monkeypatch):
    """No thread variable set, and a 4-core machine."""
    for var in VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: 4)
    return monkeypatch


def blas_threads():
    return sorted({d["num_threads"] for d in threadpoolctl.threadpool_info()
                   if d.get("user_api") == "blas"})


@pytest.mark.parametrize("phase", sorted(threads.PHASES))
def test_every_phase_by_default_one_blas_thread_and_the_pool_on_the_cores(clean_env, phase):
    s = threads.choose(phase)
    assert (s.phase, s.blas, s.pool) == (phase, 1, 4)
    assert s.why == threads.PHASES[phase]


@pytest.mark.parametrize("processes,pool", [(1, 4), (2, 2), (3, 1), (8, 1)])
def test_processes_share_the_cores(clean_env, processes, pool):
    s = threads.choose("worker", processes=processes)
    assert (s.blas, s.pool) == (1, pool)


@pytest.mark.parametrize("env,blas,pool", [
    ({"MINILORA_THREADS": "3"}, 1, 3),                            # the pool's own override
    ({"OPENBLAS_NUM_THREADS": "1"}, None, 4),                     # the BLAS left as it started
    ({"OPENBLAS_NUM_THREADS": "2"}, None, 1),                     # BLAS threads: no second pool
    ({"OMP_NUM_THREADS": "2,1"}, None, 1),                        # OpenBLAS reads it too
    ({"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "4"}, None, 4),  # OpenBLAS's order
    ({"OPENBLAS_NUM_THREADS": "2", "MINILORA_THREADS": "2"}, None, 2),
    ({"MKL_NUM_THREADS": "3"}, 1, 4),                             # validated, not OpenBLAS's
])
def test_environment_overrides(clean_env, env, blas, pool):
    for k, v in env.items():
        clean_env.setenv(k, v)
    for phase in threads.PHASES:
        s = threads.choose(phase)
        assert (s.blas, s.pool) == (blas, pool)


def test_an_explicit_pool_wins_and_cupy_takes_one_thread(clean_env):
    clean_env.setenv("MINILORA_THREADS", "3")
    assert threads.choose("train", pool=2).pool == 2
    use_backend("cupy_strict")
    assert threads.choose("train", pool=2).pool == 1


@pytest.mark.parametrize("var,value", [
    ("MINILORA_THREADS", "0"), ("MINILORA_THREADS", "-4"), ("MINILORA_THREADS", "x"),
    ("MINILORA_THREADS", "2.5"), ("MINILORA_THREADS", "100000"), ("OPENBLAS_NUM_THREADS", "0"),
    ("OPENBLAS_NUM_THREADS", "two"), ("OMP_NUM_THREADS", "2,x"), ("OMP_NUM_THREADS", "-1"),
    ("MKL_NUM_THREADS", "0"), ("GOTO_NUM_THREADS", "1e3"),
])
def test_bad_thread_variables_are_one_line_and_exit_2(clean_env, capsys, var, value):
    clean_env.setenv(var, value)
    with pytest.raises(threads.ThreadsError, match=var):
        threads.choose("train")
    assert main(["gradcheck"]) == 2  # refused before any work
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.startswith(f"minilora: error: {var} must be a whole "
                                                   f"number of threads in [1, 1024] (got {value!r})")


def test_a_phase_puts_its_setting_in_force_and_gives_the_previous_one_back(clean_env):
    threadpoolctl.threadpool_limits(2, user_api="blas")  # as OpenBLAS starts: every core
    with threads.phase("decode") as s:
        assert blas_threads() == [1] and threads.cpu_threads() == s.pool == 4
        assert threads.current().phase == "decode"
        with threads.phase("worker", processes=2):
            assert threads.cpu_threads() == 2 and threads.current().phase == "worker"
        assert threads.current().phase == "decode"
        clean_env.setenv("MINILORA_THREADS", "3")  # read again at each use
        assert threads.cpu_threads() == 3
    assert threads.current().phase == "train"
    assert blas_threads() == [1]  # minilora never gives the BLAS more threads


def test_a_blas_left_alone_when_the_user_set_its_threads(clean_env):
    clean_env.setenv("OPENBLAS_NUM_THREADS", "2")
    with threadpoolctl.threadpool_limits(2, user_api="blas"):
        with threads.phase("train") as s:
            assert blas_threads() == [2] and s.pool == 1 and threads.cpu_threads() == 1


def test_a_blas_loaded_later_is_limited_at_the_next_use(clean_env):
    threads.cpu_threads()
    with threadpoolctl.threadpool_limits(2, user_api="blas"):  # a library loaded since
        sys.modules["_minilora_test_newly_loaded"] = types.ModuleType("x")
        try:
            threads.cpu_threads()
            assert blas_threads() == [1]
        finally:
            del sys.modules["_minilora_test_newly_loaded"]


def test_train_and_generate_run_in_their_phases(clean_env, monkeypatch):
    from minilora import sample, train
    from minilora.config import GPTConfig, TrainConfig
    from minilora.model import GPT
    seen = []
    real = sample.probs_from_logits
    monkeypatch.setattr(sample, "probs_from_logits",
                        lambda *a, **k: seen.append(threads.current().phase) or real(*a, **k))
    model = GPT(GPTConfig(vocab_size=5, block_size=8, n_layer=1, n_head=2, n_embd=8), rng=0)
    sample.generate(model, np.zeros((1, 2), dtype=np.int64), 3, progress=False)
    assert seen == ["decode"] * 3
    real_step = train.AdamW.step
    monkeypatch.setattr(train.AdamW, "step",
                        lambda self, *a, **k: seen.append(threads.current().phase)
                        or real_step(self, *a, **k))
    ids = np.arange(200) % 5
    train.train(model, None, ids, ids, TrainConfig(max_steps=2, batch_size=2, block_size=8,
                                                   eval_every=10, warmup_steps=1),
                progress=False)
    assert seen[3:] == ["train", "train"]
    assert threads.current().phase == "train"


def test_child_processes_get_their_share(clean_env):
    env = threads.child_env(2, {})
    assert env == {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                   "MINILORA_THREADS": "2"}
    assert threads.child_env(8, {})["MINILORA_THREADS"] == "1"
    kept = threads.child_env(2, {"MINILORA_THREADS": "3", "OPENBLAS_NUM_THREADS": "2"})
    assert kept["MINILORA_THREADS"] == "3" and kept["OPENBLAS_NUM_THREADS"] == "2"


def test_describe_says_what_is_in_force(clean_env):
    line = threads.describe()
    assert "minilora's pool: 4" in line and "set by minilora" in line and "\n" not in line
