"""``minilora loftq``: LoftQ's residual per alternating step for every base matrix
(``results/quant/loftq_residuals.json``).
"""
from __future__ import annotations

import numpy as np

from minilora.config import QuantConfig
from minilora.nn.layers import Module
from minilora.methods.qlora import block_linears
from minilora.quant.loftq import loftq_init


def loftq_residual_study(model: Module, ranks=(4, 8, 16), n_iter: int = 10,
                         quant: QuantConfig | None = None, scaling: float = 1.0) -> dict:
    """Residual norm per LoftQ iteration for every block linear of ``model``, for each rank.

    Returns a JSON-able dict: the settings, and per rank the per-layer
    ``residual_norms`` / ``quant_error_norm`` / ``weight_norm`` and the mean relative residual
    per iteration (t = 0 is plain quantisation, B A = 0).

    Chapter: chapters/05-lora-and-qlora.ipynb
    """
    quant = quant or QuantConfig()
    modules = dict(model.named_modules())
    out = {"quant_config": quant.to_dict(), "n_iter": n_iter, "scaling": scaling,
           "ranks": {}}
    for r in ranks:
        layers = {}
        for name in block_linears(model):
            res = loftq_init(modules[name].params["weight"], r, n_iter, quant.quant_type,
                             quant.blocksize, quant.double_quant, scaling, name=name)
            layers[name] = {"weight_norm": res.weight_norm,
                            "quant_error_norm": res.quant_error_norm,
                            "residual_norms": res.residual_norms}
        rel = np.array([[v["quant_error_norm"] / v["weight_norm"]]
                         + [x / v["weight_norm"] for x in v["residual_norms"]]
                         for v in layers.values()])  # (layers, 1 + T)
        out["ranks"][str(r)] = {"layers": layers,
                                "mean_relative_residual": rel.mean(axis=0).tolist(),
                                "monotone_layers": int(sum(
                                    all(b <= a * (1 + 1e-9) for a, b in zip(row[1:], row[2:]))
                                    for row in rel)),
                                "n_layers": len(layers)}
    return out
