"""One home per method, one registry: every registered method trains, saves, loads and (where
PEFT has it) goes to PEFT's format and back with identical logits, through the library and the
command line, a module saved whole (modules_to_save) included; the finetune flags are the
config fields; a new method is one home plus one registry line."""
import dataclasses
import json
import sys

import numpy as np
import pytest
from helpers import small_method_config
from peft_gpt import FIXTURE_GPT, PEFT_DIR, fixture_gpt, logits_of, reference

from minilora import backend, cli
from minilora.checkpoint import save_checkpoint
from minilora.data import CharTokenizer
from minilora.errors import MiniloraError, UsageError
from minilora.methods.adalora import adalora_layers
from minilora.methods.registry import METHODS, get_method, method_of_file
from minilora.optim import AdamW

SAVED = ("lm_head",)


def _base():
    return fixture_gpt(reference("gpt_lora_mts"))


def _config(name):
    """A small config of each method on the fixture GPT (C = 16, 2 layers)."""
    return small_method_config(name)


def _train3(tuned, rng):
    """Three AdamW steps on random tokens (the method's callbacks run as in the harness)."""
    opt = AdamW(tuned.model, lr=5e-2, weight_decay=0.0)
    for step in range(3):
        x = backend.asarray(rng.integers(0, FIXTURE_GPT.vocab_size, (2, 8)))
        tuned.model.forward_backward(x, backend.asarray(np.roll(backend.to_numpy(x), -1, 1)))
        for cb in tuned.callbacks:
            cb.after_backward()
        opt.step(grad_clip=1.0)
        for cb in tuned.callbacks:
            cb.after_step(step)


def _prune_one_layer_to_rank_zero(tuned):
    """An AdaLoRA layer pruned to rank 0 (PEFT's allocator does that): every E of it zero."""
    (alloc,) = tuned.callbacks
    name = next(iter(adalora_layers(tuned.model)))
    alloc.layers[name].params["lora_E"][...] = 0
    alloc.rank_pattern = {n: [bool(e) for e in backend.to_numpy(m.params["lora_E"]).ravel()]
                          for n, m in alloc.layers.items()}
    return name


IDS = backend.asarray(np.random.default_rng(5).integers(0, FIXTURE_GPT.vocab_size, (2, 9)))


def _logits(model):
    return backend.to_numpy(model.forward(IDS)[0])


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_trains_saves_loads_and_round_trips_peft(name, tmp_path):
    method = METHODS[name]
    saved = () if name == "full" else SAVED
    tuned = method.apply(_base(), _config(name), saved)
    assert tuned.method is method and tuned.modules_to_save == saved
    before = {n: backend.to_numpy(p).copy() for n, p in method.trainable(tuned).items()}
    _train3(tuned, np.random.default_rng(0))
    moved = [n for n, p in method.trainable(tuned).items()
             if not np.array_equal(before[n], backend.to_numpy(p))]
    assert moved, f"{name}: nothing trained"
    if name == "adalora":
        pruned = _prune_one_layer_to_rank_zero(tuned)
    want = _logits(tuned.model)
    path = tmp_path / method.weights_file
    method.save(path, tuned, tokenizer=CharTokenizer.default())
    assert method_of_file(path) is method
    loaded = method.load(path, _base())
    assert loaded.modules_to_save == saved and loaded.method is method
    np.testing.assert_allclose(_logits(loaded.model), want, rtol=1e-12, atol=1e-12)
    if method.peft_type is None:
        with pytest.raises(MiniloraError):
            method.export_peft(tmp_path / "peft", tuned)
        return
    out = method.export_peft(tmp_path / "peft", tuned)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == method.peft_type and cfg["modules_to_save"] == list(SAVED)
    back = method.import_peft(out, _base())
    assert back.modules_to_save == saved and method_of_file(out) is method
    np.testing.assert_allclose(_logits(back.model), want, rtol=1e-12, atol=1e-12)
    if name == "adalora":
        assert adalora_layers(back.model)[pruned].r == 0
    if method.can_merge:
        np.testing.assert_allclose(_logits(method.merge(back)), want, rtol=1e-10, atol=1e-10)
        assert not any("lora_" in n or "ia3" in n for n, _ in back.model.named_parameters())


@pytest.mark.parametrize("name", [n for n, m in METHODS.items() if m.peft_type])
def test_exports_load_in_real_peft_with_the_same_logits(name, tmp_path):
    """The export of every method PEFT has, with a trained lm_head (modules_to_save) and, for
    AdaLoRA, a layer at rank 0, in real PEFT: the same logits."""
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    sys.path.insert(0, str(PEFT_DIR.parent))
    import make_peft_fixtures as fx
    from peft import PeftModel
    method = METHODS[name]
    ref = reference("gpt_lora_mts")
    tuned = method.apply(fixture_gpt(ref), _config(name), SAVED)
    _train3(tuned, np.random.default_rng(1))
    if name == "adalora":
        _prune_one_layer_to_rank_zero(tuned)
    ours = logits_of(tuned.model, ref)
    out = method.export_peft(tmp_path / "a", tuned)
    d = json.loads((out / "adapter_config.json").read_text())
    d["task_type"] = None  # the toy torch GPT has no transformers generation helpers
    (out / "adapter_config.json").write_text(json.dumps(d))
    base = {k[len("base/"):]: v for k, v in ref.items() if k.startswith("base/")}
    pm = PeftModel.from_pretrained(fx.llama_named_gpt(fx.load_torch_gpt(), base), str(out)).eval()
    np.testing.assert_allclose(fx.logits_of(pm, ref["input_ids"]), ours, rtol=0, atol=1e-10)


@pytest.fixture(scope="module")
def fixture_base(tmp_path_factory):
    d = tmp_path_factory.mktemp("base")
    save_checkpoint(d / "base.safetensors", _base(), CharTokenizer.default())
    return d / "base.safetensors"


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_through_the_command_line(name, fixture_base, tmp_path):
    """finetune -> (adapter export-peft -> import-peft) with lm_head saved whole: the adapter
    that comes back gives the trained logits."""
    method = METHODS[name]
    saved = [] if name == "full" else ["--modules-to-save", "lm_head"]
    extra = {"qlora": ["--blocksize", "16", "--r", "2"], "adalora": ["--init-r", "3",
                                                                      "--target-r", "2"],
             "houlsby": ["--bottleneck", "4"], "prefix": ["--prefix-len", "2"],
             "prompt": ["--prompt-len", "2"]}.get(name, [])
    run = tmp_path / "run"
    assert cli.main(["finetune", "--method", name, "--base", str(fixture_base), "--steps", "3",
                     "--batch-size", "2", "--block-size", "8", "--eval-batches", "1",
                     "--no-progress", "--out", str(run), *saved, *extra]) == 0
    weights = run / method.weights_file
    trained = method.load(weights, fixture_gpt(reference("gpt_lora_mts")))
    want = _logits(trained.model)
    if method.peft_type is None:
        assert cli.main(["adapter", "export-peft", str(weights), "--out", str(tmp_path / "p"),
                         "--base", str(fixture_base)]) == 2
        return
    assert cli.main(["adapter", "export-peft", str(weights), "--out", str(tmp_path / "p"),
                     "--base", str(fixture_base)]) == 0
    back = tmp_path / ("back" if name == "adalora" else "back.safetensors")
    assert cli.main(["adapter", "import-peft", str(tmp_path / "p"), "--out", str(back),
                     "--base", str(fixture_base)]) == 0
    again = method.load(back, fixture_gpt(reference("gpt_lora_mts")))
    assert again.modules_to_save == trained.modules_to_save == ("lm_head",)
    np.testing.assert_allclose(_logits(again.model), want, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# the finetune flags are the config fields
# ----------------------------------------------------------------------------------------------
def _args(argv):
    return cli.build_parser().parse_args(["finetune", *argv])


def _a_value(spec, method):
    f = spec.fields[method]
    if spec.kind == "bool":
        return None
    d = getattr(METHODS[method].default_config(steps=200), f.name)
    return ",".join(d) if isinstance(d, tuple) else str(d).lower() if isinstance(d, bool) \
        else str(d)


def test_every_flag_applies_to_exactly_the_methods_whose_config_has_the_field(capsys):
    from minilora.cli.finetune import method_config, method_flags
    flags = method_flags()
    with pytest.raises(SystemExit):
        cli.main(["finetune", "--help"])
    help_text = capsys.readouterr().out
    assert {"--r", "--alpha", "--targets", "--init-r", "--bottleneck", "--prefix-len",
            "--prompt-len", "--quant-type", "--feedforward-modules"} <= set(flags)
    for flag, spec in flags.items():
        assert flag in help_text
        for name, method in METHODS.items():
            has = any(f.name == spec.fields.get(name, f).name and name in spec.fields
                      for f in method.config_fields())
            owner = next(iter(spec.fields))
            value = _a_value(spec, name if name in spec.fields else owner)
            argv = ["--method", name] + ([flag] if value is None else [flag, value])
            if has:
                cfg = method_config(_args(argv), 200)
                field = spec.fields[name].name
                assert getattr(cfg, field) == getattr(METHODS[name].default_config(steps=200),
                                                      field) or spec.kind == "bool", (flag, name)
            else:
                with pytest.raises(UsageError, match=f"{flag} does not apply to --method {name}"):
                    method_config(_args(argv), 200)


def test_flag_ranges_are_the_configs_own():
    """A value just outside a field's declared range is refused by the config itself too, so
    the command line and the library cannot disagree."""
    from minilora.config import ConfigError
    for name, method in METHODS.items():
        for f in method.config_fields():
            lo = f.metadata.get("range", (None,))[0]
            if lo is None:
                continue
            bad = lo - 1 if "int" in str(f.type) else lo - 1e-3
            if "int" not in str(f.type) and f.metadata["range"][2]:   # open: lo itself is out
                bad = lo
            with pytest.raises(ConfigError):
                dataclasses.replace(method.default_config(steps=200), **{f.name: bad})


def test_renamed_and_unknown_methods_are_one_line(capsys):
    assert cli.main(["finetune", "--method", "adapter"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("minilora: error: --method: method 'adapter' is now called 'houlsby' "
                   "(\"adapter\" means a trained adapter file of any method); use 'houlsby'")
    with pytest.raises(UsageError, match="unknown method 'nope'; allowed: full, lora"):
        get_method("nope")


# ----------------------------------------------------------------------------------------------
# adding a method: its home + one registry line
# ----------------------------------------------------------------------------------------------
TOY = '''
from dataclasses import dataclass
from minilora.config import JsonConfig, check_float, option
from minilora.methods.base import Method, Tuned


@dataclass(frozen=True)
class ToyConfig(JsonConfig):
    """Train only the final LayerNorm's gain, started at toy_scale."""
    toy_scale: float = option(1.0, "the gain's start", range=(0, None, True, False))

    def __post_init__(self):
        check_float("toy_scale", self.toy_scale, lo=0.0, lo_open=True)


class ToyMethod(Method):
    name = "toy"
    config_cls = ToyConfig
    summary = "toy: only ln_f's gain trains"
    weights_file = "toy.json"
    lr = (1e-2, 1e-3)

    def _apply(self, model, config):
        model.ln_f.params["weight"][...] = config.toy_scale
        model.set_trainable(lambda n: n == "ln_f.weight")
        return Tuned(model, config, self)


TOY = ToyMethod()
'''


def test_a_new_method_is_its_home_plus_one_registry_line(tmp_path, monkeypatch, capsys,
                                                         fixture_base):
    (tmp_path / "toy_method.py").write_text(TOY)
    monkeypatch.syspath_prepend(str(tmp_path))
    import toy_method
    monkeypatch.setitem(METHODS, "toy", toy_method.TOY)          # the one registry line
    with pytest.raises(SystemExit):
        cli.main(["finetune", "--help"])
    out = capsys.readouterr().out
    assert "--toy-scale" in out and "toy: the gain's start" in out and "--method toy" in out
    assert cli.main(["finetune", "--method", "toy", "--toy-scale", "0", "--steps", "1"]) == 2
    assert "--toy-scale must be > 0 (got 0)" in capsys.readouterr().err
    assert cli.main(["finetune", "--method", "lora", "--toy-scale", "2"]) == 2
    assert "--toy-scale does not apply to --method lora" in capsys.readouterr().err
    from minilora.experiments.finetune import finetune
    r = finetune("toy", "milton", toy_method.ToyConfig(toy_scale=0.5),
                 {"max_steps": 2, "batch_size": 1, "block_size": 8}, base_path=fixture_base,
                 progress=False, eval_batches=1, measure_memory=False)
    assert r["method"] == "toy" and r["trainable_params"] == FIXTURE_GPT.n_embd
    assert r["method_config"] == {"toy_scale": 0.5}
