"""Side by side: gradience 0.11's `audit` and `minilora svd` on the same PEFT adapters.

gradience is not a dependency of minilora: install it in a throwaway venv (it pulls torch),
    pip install gradience==0.11.0
then, from the repository root:
    python results/svd/gradience/compare.py /tmp/gradience-vs-minilora > results/svd/gradience/comparison.txt
"""
import json, subprocess, sys, csv
from pathlib import Path
out = Path(sys.argv[1]); out.mkdir(exist_ok=True)
cases = ["tests/data/peft/llama_lora", "tests/data/peft/llama_lora_rs", "tests/data/svd/gpt2_conv1d_true", "tests/data/svd/bart_lora"]
for c in cases:
    name = Path(c).name
    g = subprocess.run(["gradience", "audit", "--peft-dir", c, "--json", "--layers"], capture_output=True, text=True)
    gd = json.loads(g.stdout)
    rows = {r["name"].replace("base_model.model.", ""): r for r in gd["layer_data"]["layer_rows"]}
    subprocess.run(["minilora", "svd", c, "--serial", "--no-figures", "--overwrite", "--out", str(out / name)], capture_output=True, text=True, check=True)
    ours = {r["module"]: r for r in csv.DictReader(open(out / name / "summary.csv"))}
    print(f"== {name}: gradience {len(rows)} modules, minilora {len(ours)}; gradience order: {[k.split('.')[-3:] for k in list(rows)[:3]]}")
    worst = {}
    for m, o in ours.items():
        if m not in rows:
            print("   only in minilora:", m, o["kind"]); continue
        r = rows[m]
        for f, gf in (("delta_spectral", "delta_sigma_max"), ("delta_fro", "delta_fro_norm"), ("stable_rank", "stable_rank"), ("effective_rank", "effective_rank"), ("utilisation", "utilization")):
            rel = abs(float(o[f]) - r[gf]) / abs(float(o[f]))
            worst[f] = max(worst.get(f, 0), rel)
        for f in ("rank_90", "rank_95", "rank_99"):
            if int(o[f]) != r["energy_" + f]:
                worst["mismatch " + f] = worst.get("mismatch " + f, 0) + 1
        if int(o["knee"]) != r["rank_suggestions"]["knee"]["k"]:
            worst["knee differs"] = worst.get("knee differs", 0) + 1
    print("   max relative difference:", {k: (f"{v:.2e}" if isinstance(v, float) else v) for k, v in worst.items()})
    types = {}
    for m, r in rows.items():
        types.setdefault(r["module_type"], set()).add(".".join(m.split(".")[-2:]))
    print("   gradience types:", {k: sorted(v) for k, v in types.items()})
    print("   scale: gradience", sorted({r["scale"] for r in rows.values()}), "minilora", sorted({float(o["scale"]) for o in ours.values()}))

# merge triage of a pair built to share exactly 2 of 4 input directions per module
# (tests/data/peft/llama_lora_b copies the first two rows of every lora_A of llama_lora)
a, b = "tests/data/peft/llama_lora", "tests/data/peft/llama_lora_b"
g = subprocess.run(["gradience", "merge-audit", "--adapter-a", a, "--adapter-b", b, "--json"],
                   capture_output=True, text=True)
gd = json.loads(g.stdout)
gv = {}
for layer in gd["per_layer"]:
    gv[layer["verdict"]] = gv.get(layer["verdict"], 0) + 1
subprocess.run(["minilora", "svd", a, b, "--serial", "--no-figures", "--overwrite", "--out",
                str(out / "pair")], capture_output=True, text=True, check=True)
ov = {}
for p in csv.DictReader(open(out / "pair" / "pairs.csv")):
    ov[p["verdict"]] = ov.get(p["verdict"], 0) + 1
print(f"== merge triage {Path(a).name} vs {Path(b).name} (2 of 4 input directions shared by "
      f"construction in every module)")
print(f"   gradience merge-audit: {gv}; overall {gd['aggregate']['overall_verdict']!r}, mean "
      f"overlap {gd['aggregate']['mean_overlap']:.3f}")
print(f"   minilora svd: {ov}")
