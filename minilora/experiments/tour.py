"""``minilora tour``: a 1-3 minute guided run for a newcomer.

1. load the shipped Shakespeare base model and say what it is;
2. sample from it;
3. check gradients of every op against finite differences;
4. fine-tune it for a few steps on Milton with a progress bar, and sample again;
5. point to the chapters and the next commands.

Each step prints what it does and why, so the output reads as a short lesson.
"""
from __future__ import annotations

import textwrap
import time

from minilora import backend, gradcheck
from minilora.checkpoint import load_checkpoint
from minilora.methods.lora.config import LoraConfig
from minilora.config import TrainConfig
from minilora.data import encode_corpus, load_milton, load_shakespeare
from minilora.experiments.paths import base_model_path
from minilora.methods.lora import inject_lora
from minilora.sample import sample_text
from minilora.train import evaluate, fixed_batches, train


def _h(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 74 - len(title)))


def _say(text: str) -> None:
    print(textwrap.fill(" ".join(text.split()), width=88))


def run_tour(fast: bool = False) -> None:

    t_start = time.perf_counter()
    _h("1. The base model")
    path = base_model_path()
    model, tok, info = load_checkpoint(path)
    cfg = model.config
    extra = info.get("extra", {})
    _say(f"""minilora is a GPT written in plain {backend.get_backend()} with hand-written backward
        passes: no autograd anywhere. The shipped base model ({path.name}) has
        {model.num_parameters():,} parameters: {cfg.n_layer} layers, width {cfg.n_embd},
        {cfg.n_head} heads, a context of {cfg.block_size} characters and a {tok.vocab_size}-symbol
        ASCII vocabulary. It was pretrained on Shakespeare with every play but Hamlet and The
        Tempest.""")
    if "val_loss_nats_per_char" in extra:
        v = extra["val_loss_nats_per_char"]
        print(f"   validation loss on the held-out plays: {v:.3f} nats/char "
              f"({v / 0.693147:.3f} bits/char)")

    _h("2. Sampling")
    _say(f"""Text is generated one character at a time: the model gives a probability for each of
        the 97 symbols, we sharpen it with a temperature of 0.8 and draw one (seeded). A KV cache
        keeps every layer's keys and values, so each new character runs the model on that one
        position only; past {cfg.block_size} characters the window is re-encoded (the position
        embeddings are absolute).""")
    n_new = 160 if fast else 300
    t0 = time.perf_counter()
    text = sample_text(model, tok, "ROMEO:\n", n_new, 0.8, None, seed=1)
    dt = time.perf_counter() - t0
    print(textwrap.indent(text, "   | "))
    print(f"   ({n_new} characters in {dt:.2f} s, {n_new / dt:,.0f} characters/s)")

    _h("3. Checking every gradient")
    _say("""Each backward pass is compared with centred finite differences
        (f(x+h) - f(x-h)) / 2h in float64. A correct gradient agrees to ~1e-8 relative; a wrong
        one is off by O(1). Here are the ops, then a whole tiny GPT through its loss:""")
    rows = gradcheck.op_suite(0)
    model_rows = gradcheck.tiny_model_check(0)
    table = gradcheck.format_table(rows).splitlines()
    print("\n".join("   " + line for line in table[:8] + ["   ..."] + table[-1:]))
    worst = max(r["rel_error"] for r in model_rows)
    print(f"   whole tiny model: {sum(r['ok'] for r in model_rows)}/{len(model_rows)} parameters "
          f"pass (worst relative error {worst:.1e})")

    _h("4. Fine-tuning for a few steps")
    steps = 15 if fast else 60
    _say(f"""Now we fine-tune all weights (full fine-tuning) on Milton's Paradise Lost for {steps}
        steps. Watch the Milton validation loss fall; the Shakespeare loss may rise a little
        (forgetting), which later chapters measure and which LoRA reduces.""")
    milton = load_milton()
    tr, te = encode_corpus(milton["train"], tok), encode_corpus(milton["test"], tok)
    sh_val = encode_corpus(load_shakespeare()["val"], tok)
    tcfg = TrainConfig(max_steps=steps, batch_size=8, block_size=128, lr=1e-3, min_lr=1e-4,
                       warmup_steps=5, eval_every=steps, eval_batches=4, ckpt_every=steps, seed=0)
    milton_batches = fixed_batches(te, 4, 8, 128, seed=1)
    sh_batches = fixed_batches(sh_val, 4, 8, 128, seed=1)
    m0, s0 = evaluate(model, milton_batches), evaluate(model, sh_batches)
    train(model, tok, tr, None, tcfg, out_dir=None, progress=True)
    m1, s1 = evaluate(model, milton_batches), evaluate(model, sh_batches)
    print(f"   Milton (Book X, unseen) loss: {m0:.3f} -> {m1:.3f} nats/char")
    print(f"   Shakespeare (held-out plays) loss: {s0:.3f} -> {s1:.3f} nats/char")
    print(textwrap.indent(sample_text(model, tok, "Of Man's first", 120 if fast else 200, 0.8,
                                      None, seed=1), "   | "))

    _h("4b. The same fine-tune with LoRA")
    lora_model, _, _ = load_checkpoint(path)
    report = inject_lora(lora_model, LoraConfig(r=8, lora_alpha=16, target_modules=("q", "v")))
    _say(f"""LoRA freezes every base weight W0 and learns a low-rank update ΔW = (alpha/r) B A on
        the attention's W_q and W_v only (r = 8, alpha = 16): {report['trainable']:,} trainable
        parameters out of {report['total']:,} ({report['percent']:.2f}%). B starts at zero, so
        the model starts exactly as the base. Same data, steps and schedule, a larger learning
        rate as usual for LoRA:""")
    lcfg = TrainConfig(**dict(tcfg.to_dict(), lr=5e-3, min_lr=5e-4))
    train(lora_model, tok, tr, None, lcfg, out_dir=None, progress=True)
    m2, s2 = evaluate(lora_model, milton_batches), evaluate(lora_model, sh_batches)
    print(f"   {'':24}{'Milton':>10}{'Shakespeare':>13}   trainable")
    print(f"   {'base':24}{m0:>10.3f}{s0:>13.3f}")
    print(f"   {'full fine-tuning':24}{m1:>10.3f}{s1:>13.3f}   {model.num_parameters():,}")
    print(f"   {'LoRA r=8 on q,v':24}{m2:>10.3f}{s2:>13.3f}   {report['trainable']:,}")
    _say("""(nats/char; lower is better.) The Shakespeare column is forgetting: how much worse the
        model got at what it knew. The LoRA chapters measure it properly.""")

    _h("5. Where next")
    _say("""Read the chapters in chapters/ (start with 01-foundations.ipynb) with
        `jupyter lab chapters/`. Try: `minilora sample --prompt "KING LEAR:"`,
        `minilora gradcheck`, `minilora pretrain --preset tiny --out runs/tiny`,
        `minilora bench`. Every command has --help.""")
    print(f"\n(tour finished in {time.perf_counter() - t_start:.0f} s)")
