"""minilora figures: figures come from saved results; missing results are reported, not faked."""
import json

import pytest

from minilora.experiments.figures import FIGURES, MissingResults, make_figures
from minilora.experiments.figures.common import read_json


def test_base_pretrain_figure_from_saved_metrics(tmp_path):
    res = tmp_path / "results"
    res.mkdir()
    recs = [{"step": i, "loss": 4.0 - i / 10} for i in range(10)] + [{"step": 9, "val_loss": 3.2}]
    (res / "base_pretrain_metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = make_figures(["base_pretrain"], res, tmp_path / "fig", log=lambda s: None)
    png = tmp_path / "fig" / "base_pretrain.png"
    assert out["base_pretrain"] == [str(png)]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_results_are_skipped_with_the_command(tmp_path):
    out = make_figures(["base_pretrain"], tmp_path, tmp_path / "fig", log=lambda s: None)
    assert out["base_pretrain"].startswith("skipped:") and "minilora pretrain" in out["base_pretrain"]
    with pytest.raises(MissingResults, match="make it with: x"):
        read_json(tmp_path / "nope.json", "x")


def test_unknown_figure_is_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="allowed: " + next(iter(FIGURES))):
        make_figures(["nope"], tmp_path, tmp_path)
