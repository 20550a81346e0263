"""Every figure in ``figures/``, drawn only from saved results: ``minilora figures``.

A figure is a function ``f(results: Path, figures: Path) -> list[Path]`` in one of this package's
modules, registered in :data:`FIGURES` (a dict of the functions themselves). A figure whose
results are missing raises :class:`MissingResults` naming the command that makes them;
:func:`make_figures` reports it and goes on with the others.
"""
from __future__ import annotations

import os
import re
import traceback
from pathlib import Path

from minilora.errors import UsageError
from minilora.experiments.figures.ablate import fig_budget, fig_pareto, fig_rank
from minilora.experiments.figures.adalora import fig_adalora_ranks
from minilora.experiments.figures.adapters import fig_claim
from minilora.experiments.figures.common import MissingResults, pyplot
from minilora.experiments.figures.delta_w import (
    fig_amplification,
    fig_full_vs_lora,
    fig_intruders,
    fig_intruders_forgetting,
    fig_phi,
    fig_pretrained_spectra,
)
from minilora.experiments.figures.paged import fig_paged
from minilora.experiments.figures.pretrain import fig_base_pretrain
from minilora.experiments.figures.quant import (
    fig_code_histogram,
    fig_error_vs_blocksize,
    fig_loftq_residuals,
    fig_qlora_compare,
)
from minilora.experiments.figures.svd import fig_svd_milton

#: name -> figure function; add one line per figure.
FIGURES = {
    "base_pretrain": fig_base_pretrain,
    "quant_error_vs_blocksize": fig_error_vs_blocksize,
    "quant_code_histogram": fig_code_histogram,
    "paged": fig_paged,
    "multi_adapter_claim": fig_claim,
    "loftq_residuals": fig_loftq_residuals,
    "qlora_compare": fig_qlora_compare,
    "ablate_pareto": fig_pareto,
    "ablate_rank": fig_rank,
    "ablate_budget": fig_budget,
    "delta_w_pretrained_spectra": fig_pretrained_spectra,
    "delta_w_phi": fig_phi,
    "delta_w_amplification": fig_amplification,
    "delta_w_full_vs_lora": fig_full_vs_lora,
    "delta_w_intruders": fig_intruders,
    "delta_w_intruders_forgetting": fig_intruders_forgetting,
    "svd_milton_lora": fig_svd_milton,
    "adalora_ranks": fig_adalora_ranks,  # AdaLoRA's final rank per layer (results/finetune/*adalora*)  # `minilora svd` on the Milton LoRA (results/svd/)
}


def make_figures(names=None, results="results", figures="figures", log=print) -> dict:
    """Make the named figures (default: all), in :data:`FIGURES`' order. Returns ``{name: [paths]
    or "skipped: why" or "failed: why"}``.

    A figure whose results are missing (or too few for it) is skipped with one line saying what
    it needs, its hint naming ``results`` where the command to make them writes; a figure that
    fails (a bug) is reported in one line and the others are still drawn.
    """
    results, figures = Path(results), Path(figures)
    names = list(FIGURES) if not names else [n for n in FIGURES if n in names] + \
        [n for n in names if n not in FIGURES]
    unknown = [n for n in names if n not in FIGURES]
    if unknown:
        raise UsageError(f"unknown figure(s) {', '.join(unknown)}; allowed: {', '.join(FIGURES)}")
    if figures.exists() and not figures.is_dir():
        raise UsageError(f"--figures {str(figures)!r} is a file, not a directory")
    figures.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in names:
        try:
            paths = FIGURES[name](results, figures)
            out[name] = [str(p) for p in paths]
            log(f"{name}: " + ", ".join(out[name]))
        except MissingResults as e:
            out[name] = f"skipped: {_hint_for(str(e), results)}"
            log(f"{name}: {out[name]}")
        except Exception as e:  # noqa: BLE001 - one figure's bug must not stop the others
            pyplot().close("all")
            if os.environ.get("MINILORA_DEBUG"):
                raise
            where = traceback.extract_tb(e.__traceback__)[-1]
            out[name] = (f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                         f" (at {Path(where.filename).name}:{where.lineno}; a bug in minilora, "
                         "MINILORA_DEBUG=1 shows the traceback)")
            log(f"{name}: {out[name]}")
    return out


def _hint_for(text: str, results: Path) -> str:
    """A missing-results hint with the committed ``results/`` replaced by the results directory
    the figures were asked to draw from (the user's own, where their command should write)."""
    if results == Path("results"):
        return text
    return re.sub(r"(?<![\w./-])results/", f"{results.as_posix()}/", text)


__all__ = ["FIGURES", "MissingResults", "make_figures"]
