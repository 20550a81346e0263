"""The full-size experiments of chapters 02, 03 and 07, run once; JSON under results/chapters/.

    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 python -m minilora.experiments.studies.chapter_runs NAME ...

NAME: init, rslora, lora_prefix, delta_w, overfit, scratch (see the ``run_*`` functions). The
records committed under ``results/chapters/`` were made by this module (then run as a script
named drivers.py, whose text each record keeps under "script"); the chapters run the same
experiments in a few steps in quick mode and load these records in full mode.
"""
import json
import sys
import time
from pathlib import Path

import numpy as np

from minilora import analysis as an
from minilora.checkpoint import load_checkpoint, save_checkpoint
from minilora.methods.lora.config import LoraConfig
from minilora.config import TrainConfig
from minilora.data import encode_corpus, load_milton
from minilora.experiments.finetune import default_lora_config, finetune
from minilora.methods.base import Method, Tuned
from minilora.methods.registry import METHODS
from minilora.experiments.paths import base_model_path
from minilora.methods.lora import inject_lora, load_adapter, lora_layers, merge_lora, read_adapter
from minilora.model import GPT
from minilora.methods.prefix import PrefixConfig, add_prefix
from minilora.train import evaluate, fixed_batches, train

OUT = Path("results/chapters"); RUNS = Path("runs/chapters")
SCRIPT = Path(__file__).read_text()


def write(name, payload):
    OUT.mkdir(parents=True, exist_ok=True)
    payload = {"made_by": "OPENBLAS_NUM_THREADS=1 python -m "
                          f"minilora.experiments.studies.chapter_runs {name}",
               **payload, "script": SCRIPT}
    (OUT / f"{name}.json").write_text(json.dumps(payload, indent=1) + "\n")
    print("wrote", OUT / f"{name}.json", flush=True)


def slim(r):
    keep = ("method", "task", "method_config", "task_metric_base", "task_metric",
            "shakespeare_loss_base", "shakespeare_loss", "forgetting", "trainable_params",
            "total_params", "median_step_ms", "train_seconds", "task_metric_init")
    return {k: r[k] for k in keep if k in r}


def run_init():
    runs = {}
    for init in ("swap", "pissa", "gaussian"):
        t = time.time()
        r = finetune("lora", "milton", default_lora_config("milton", init_lora_weights=init),
                     progress=False, measure_memory=False)
        runs[init] = slim(r); print(init, r["task_metric"], r["forgetting"], time.time() - t, flush=True)
    ref = json.loads(Path("results/finetune/milton-lora/result.json").read_text())
    runs["standard"] = {**slim(ref), "from": "results/finetune/milton-lora/result.json"}
    write("init_swap", {"runs": runs})


def run_rslora():
    runs = []
    for r_ in (2, 16, 128):
        for rs in (False, True):
            cfg = LoraConfig(r=r_, lora_alpha=16, target_modules=("q", "v"), use_rslora=rs)
            d = RUNS / f"rs-{r_}-{int(rs)}"
            res = finetune("lora", "milton", cfg, train_config={"max_steps": 100},
                           out_dir=d, progress=False, measure_memory=False, eval_batches=8)
            arrays, c = read_adapter(d / "adapter.safetensors")
            m, _, _ = load_checkpoint(base_model_path()); load_adapter(d / "adapter.safetensors", m)
            norms = [float(np.linalg.norm(l.delta_weight())) for l in lora_layers(m).values()]
            runs.append({"r": r_, "use_rslora": rs, "scaling": 16 / (np.sqrt(r_) if rs else r_),
                         "delta_w_fro_mean": float(np.mean(norms)), **slim(res)})
            print(r_, rs, res["task_metric"], np.mean(norms), flush=True)
    write("rslora_sweep", {"runs": runs, "note": "100 steps, eval_batches 8, alpha 16, q,v, lr 5e-3"})


class LoraPrefix(Method):
    """LoRA r=8 on q, v inside the GPT, then a trainable K/V prefix around it; both train."""

    name = "lora+prefix"
    summary = "LoRA on q, v and a 16-slot prefix, trained together"
    lr = (5e-3, 5e-4)
    base_differs = "wrapped"

    def _apply(self, model, config):
        inject_lora(model, LoraConfig(r=8, lora_alpha=16, target_modules=("q", "v")))
        wrapped = add_prefix(model, PrefixConfig())
        wrapped.set_trainable(lambda n: n.startswith("prefix.") or ".lora_" in n)
        return Tuned(wrapped, None, self)

    def record(self, tuned):
        return {"lora": LoraConfig(r=8, lora_alpha=16, target_modules=("q", "v")).to_dict(),
                "prefix": PrefixConfig().to_dict()}


def run_lora_prefix():
    METHODS["lora+prefix"] = LoraPrefix()   # a method = its home + one registry line
    r = finetune("lora+prefix", "milton", progress=False, measure_memory=False)
    ref = {m: slim(json.loads(Path(f"results/finetune/milton-{m}/result.json").read_text()))
           for m in ("lora", "prefix")}
    write("lora_prefix", {"runs": {"lora+prefix": slim(r), **ref},
                          "note": "lora+prefix at LoRA's lr 5e-3 (one optimizer); lora and prefix "
                                  "from results/finetune (prefix at its own lr 3e-2)"})


def spectra(W0, W1, k=10):
    dW = W1 - W0
    s = an.singular_values(dW)
    U0 = an.svd(W0).U; U1 = an.svd(W1).U
    mc = an.max_cosines(U0, U1)[:k]
    return {"sv_top": [float(x) for x in s[:40]], "fro": float(np.linalg.norm(dW)),
            "effective_rank": float(an.effective_rank(s)),
            "rank90": int(an.rank_for_energy(s, 0.9)),
            "stable_rank": float(an.stable_rank(s)),
            "max_cos_top10": [float(x) for x in mc],
            "intruders": {str(e): int((mc < e).sum()) for e in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)}}


def run_delta_w():
    d = RUNS / "milton-full"
    t = time.time()
    if (d / "result.json").exists():
        full = json.loads((d / "result.json").read_text())
    else:
        full = finetune("full", "milton", out_dir=d, progress=False, measure_memory=False)
    print("full", full["task_metric"], time.time() - t, flush=True)
    dl = RUNS / "milton-lora"
    if (dl / "result.json").exists():
        lora = json.loads((dl / "result.json").read_text())
    else:
        lora = finetune("lora", "milton", out_dir=dl, progress=False, measure_memory=False)
    print("lora", lora["task_metric"], time.time() - t, flush=True)
    base, _, _ = load_checkpoint(base_model_path())
    ft, _, _ = load_checkpoint(d / "model.safetensors")
    lo, _, _ = load_checkpoint(base_model_path())
    load_adapter(dl / "adapter.safetensors", lo); merge_lora(lo)
    W = lambda m: {n: np.asarray(p, dtype=np.float64) for n, p in m.named_parameters()}
    Wb, Wf, Wl = W(base), W(ft), W(lo)
    mats = {}
    for n in Wb:
        if Wb[n].ndim != 2 or not n.startswith("blocks."):
            continue
        mats[n] = {"shape": list(Wb[n].shape), "W0": {"effective_rank": float(an.effective_rank(an.singular_values(Wb[n]))),
                                                       "rank90": int(an.rank_for_energy(an.singular_values(Wb[n]), 0.9)),
                                                       "numerical_rank": int(an.numerical_rank(an.singular_values(Wb[n]))),
                                                       "sv_top": [float(x) for x in an.singular_values(Wb[n])[:40]]},
                   "full": spectra(Wb[n], Wf[n])}
        if not np.array_equal(Wl[n], Wb[n]):
            mats[n]["lora"] = spectra(Wb[n], Wl[n])
    write("delta_w_milton", {"full_run": slim(full),
                             "lora_run": slim(lora),
                             "matrices": mats})


def run_overfit(n_chars=4096, steps=200):
    base, tok, _ = load_checkpoint(base_model_path())
    mil = load_milton()
    tr = encode_corpus(mil["train"][:n_chars], tok); te = encode_corpus(mil["test"], tok)
    out = {}
    for method in ("full", "lora"):
        m, _, _ = load_checkpoint(base_model_path())
        lr = 1e-3
        if method == "lora":
            inject_lora(m, LoraConfig(r=8, lora_alpha=16, target_modules=("q", "v"))); lr = 5e-3
        cfg = TrainConfig(max_steps=steps, batch_size=8, block_size=128, lr=lr, min_lr=lr / 10,
                          warmup_steps=20, eval_every=20, eval_batches=8, ckpt_every=10**9)
        tr_b = fixed_batches(tr, 8, 8, 128, seed=1)
        h = train(m, tok, tr, te, cfg, progress=False)
        out[method] = {"trainable": m.num_parameters(trainable_only=True),
                       "train_loss": [(r["step"], r["loss"]) for r in h.train],
                       "val_loss": [(r["step"], r["val_loss"]) for r in h.val],
                       "train_eval_final": evaluate(m, tr_b), "seconds": h.seconds}
        print(method, h.val[-1], out[method]["train_eval_final"], flush=True)
    write("overfit_small", {"n_chars": n_chars, "steps": steps, "runs": out,
                            "note": "train on the first n_chars of Milton's training books; "
                                    "val = Book X (8 fixed batches)"})


def run_scratch():
    base, tok, _ = load_checkpoint(base_model_path())
    rnd = GPT(base.config, rng=0, dtype="float32")
    p = RUNS / "random-init.safetensors"; RUNS.mkdir(parents=True, exist_ok=True)
    save_checkpoint(p, rnd, tok)
    r = finetune("full", "milton", base_path=p, progress=False, measure_memory=False)
    ref = slim(json.loads(Path("results/finetune/milton-full/result.json").read_text()))
    write("scratch_vs_finetune", {"scratch": slim(r), "finetune": ref})


if __name__ == "__main__":
    for name in sys.argv[1:]:
        t = time.time(); globals()[f"run_{name}"](); print(name, "done", time.time() - t, flush=True)
