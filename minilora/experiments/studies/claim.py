"""The articles' claim "one general LoRA vs per-task LoRAs switched at inference", measured:
``minilora adapter claim`` (per-task adapters hot-swapped vs one adapter trained on all tasks).
"""
from __future__ import annotations

import json
from pathlib import Path

from minilora.adapters import AdapterRegistry
from minilora.checkpoint import load_checkpoint
from minilora.methods.lora.config import LoraConfig
from minilora.errors import UsageError
from minilora.experiments.finetune import default_train_config, finetune
from minilora.experiments.methods import method_setup
from minilora.experiments.paths import base_model_path
from minilora.experiments.scoring import format_scores, score_adapters
from minilora.experiments.tasks import TASKS, task_batch_fn
from minilora.io import atomic_write_text
from minilora.train import train

CLAIM_COMMAND = "minilora adapter claim --out results/multi_adapter"


def train_general_adapter(tasks, lora_config: LoraConfig, max_steps: int, out_dir,
                          base_path=None, progress: bool = False) -> dict:
    """Train one LoRA on all ``tasks``: step k trains on task ``k mod len(tasks)`` (round robin,
    so each task gets exactly ``max_steps / len(tasks)`` batches, as in its own per-task run).

    The harness's LoRA setup and training config (:func:`minilora.experiments.finetune.default_train_config`:
    batch 8 x 128, warmup, cosine, LoRA's learning rate) with ``max_steps``. Each batch is one
    task's: a batch mixing tasks row by row would let the language-modelling rows, scored at
    every position, drown the single scored position of a classification row.
    Writes ``out_dir/adapter.safetensors``; returns ``{"train_seconds", "final_loss",
    "train_config"}``.
    """

    model, tok, _ = load_checkpoint(base_path or base_model_path())
    setup = method_setup("lora")(model, tok, lora_config)
    tcfg = default_train_config(setup, max_steps=max_steps)
    fns = [task_batch_fn(t, tok, tcfg.batch_size, tcfg.block_size) for t in tasks]
    step = [0]

    def batch_fn(rng):  # round robin; this run is never resumed, so the counter is safe
        fn = fns[step[0] % len(fns)]
        step[0] += 1
        return fn(rng)

    hist = train(setup.model, tok, None, None, tcfg, out_dir=None, progress=progress,
                 batch_fn=batch_fn)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    setup.save(out)
    return {"train_seconds": hist.seconds, "final_loss": hist.train[-1]["loss"],
            "train_config": tcfg.to_dict()}


def run_claim(out_dir="results/multi_adapter", tasks=("milton", "python"), steps: int = 200,
              r: int = 8, lora_alpha: float = 16, targets=("q", "v"), eval_batches: int = 16,
              eval_examples: int | None = None, runs_dir="runs/multi_adapter",
              progress: bool = False, log=print) -> dict:
    """Per-task LoRAs, hot-swapped, vs one general LoRA trained on the mixed tasks.

    * per task: :func:`minilora.experiments.finetune.finetune` ("lora", ``steps`` steps, rank ``r``);
    * general: the same LoRA config and schedule for ``steps * len(tasks)`` steps, round robin
      over the tasks (:func:`train_general_adapter`): the same total steps and data per task;
    * scoring: every task's test set with the base, its own adapter and the general one, all in
      one mixed-adapter batch per window (:func:`score_adapters`).

    Writes ``out_dir/claim.json`` (atomically) and the adapters under ``runs_dir``.
    """

    tasks = tuple(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise UsageError(f"unknown task(s) {unknown}; allowed: {', '.join(TASKS)}")
    if len(tasks) < 2 or len(set(tasks)) != len(tasks):
        raise UsageError(f"the claim compares per-task adapters with a general one: give at "
                         f"least two distinct tasks, got {list(tasks)}")
    cfg = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=tuple(targets))
    runs = Path(runs_dir)
    per_task = {}
    for t in tasks:
        log(f"[claim] per-task LoRA on {t}: {steps} steps")
        res = finetune("lora", t, cfg, {"max_steps": steps}, out_dir=runs / t, progress=progress,
                       eval_batches=eval_batches, eval_examples=eval_examples)
        per_task[t] = {"train_seconds": res["train_seconds"], "task_metric": res["task_metric"],
                       "train_config": res["train_config"]}
    general_steps = steps * len(tasks)
    log(f"[claim] general LoRA on {'+'.join(tasks)}: {general_steps} steps, round robin")
    general = train_general_adapter(tasks, cfg, general_steps, runs / "general",
                                    progress=progress)

    base, tok, _ = load_checkpoint(base_model_path())
    reg = AdapterRegistry(base)
    for t in tasks:
        reg.load(t, runs / t / "adapter.safetensors")
    reg.load("general", runs / "general" / "adapter.safetensors")
    tc = per_task[tasks[0]]["train_config"]
    results = {}
    for t in tasks:
        log(f"[claim] scoring {t}: base, {t}, general in one mixed batch per window")
        s = score_adapters(reg, tok, t, [None, t, "general"], eval_batches,
                           tc["batch_size"], tc["block_size"], eval_examples)
        sc = s["scores"]
        better = sc[t] > sc["general"] if s["higher_is_better"] else sc[t] < sc["general"]
        results[t] = {"metric": s["metric"], "higher_is_better": s["higher_is_better"],
                      "base": sc["base"], "per_task": sc[t], "general": sc["general"],
                      "per_task_better": bool(better), "score_seconds": s["seconds"]}
        log(format_scores(t, s))
    holds = all(v["per_task_better"] for v in results.values())
    command = CLAIM_COMMAND
    if (tasks, steps) != (("milton", "python"), 200):
        command += f" --tasks {','.join(tasks)} --steps {steps}"
    record = {
        "claim": "one general LoRA on mixed tasks underperforms per-task LoRAs that are hot-swapped",
        "holds_here": holds, "command": command,
        "tasks": list(tasks), "lora_config": cfg.to_dict(),
        "steps_per_task": steps, "general_steps": general_steps,
        "train_config_per_task": tc, "train_config_general": general["train_config"],
        "train_seconds": {**{t: v["train_seconds"] for t, v in per_task.items()},
                          "general": general["train_seconds"]},
        "eval_batches": eval_batches, "eval_examples": eval_examples,
        "adapter_bytes": {n: a.nbytes for n, a in reg.adapters.items()},
        "results": results,
    }
    out = Path(out_dir)
    atomic_write_text(out / "claim.json", json.dumps(record, indent=2) + "\n")
    log(f"[claim] {'holds' if holds else 'does NOT hold'} here; written {out / 'claim.json'}")
    return record
