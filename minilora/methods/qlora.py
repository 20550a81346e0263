"""QLoRA: LoRA factors in float32 around a frozen base held only as 4-bit codes; LoftQ init.

QLoRA (Dettmers et al. 2023, Eq. 5-6) in minilora's layout::

    W_hat = doubleDequant(c1, c2, W_NF4)                       (d_out, d_in), per call
    out   = x @ W_hat.T + b + scaling * (dropout(x) @ A.T) @ B.T
    dx    = dout @ W_hat + (LoRA's dx)                         W_hat dequantised again
    dA, dB as in LoRA; no dW (the codes are frozen)

:class:`QLoRALinear` *is* :class:`minilora.methods.lora.LoRALinear` (the same A/B maths, dropout,
scaling, init, adapter files); only the base path differs: a
:class:`minilora.quant.linear.QuantWeight` dequantised on the fly instead of a float W0.

:func:`inject_qlora` quantises every block linear of the base (as :mod:`minilora.quant.model_quant`
does: q, k, v, o, up, down; embeddings, LM head, LayerNorms and biases stay float32) and wraps
the ``target_modules`` with LoRA.

**LoftQ** (Li et al. 2023, Algorithm 1), :func:`loftq_init`: instead of quantising W and
starting with B A = 0, alternate

    Q_t          = quant(W - scaling * B_{t-1} A_{t-1})          (B_0 A_0 = 0)
    R_t          = W - dequant(Q_t)
    U S Vh       = svd(R_t)
    A_t, B_t     = sqrt(S_r / scaling) Vh_r,  U_r sqrt(S_r / scaling)

so that ``dequant(Q_T) + scaling * B_T A_T`` approximates W better than ``dequant(quant(W))``.
Each factor gets sqrt(S), as in PEFT's ``_low_rank_decomposition`` (``L = U sqrt(S)``,
``R = sqrt(S) Vh``, lora_B = L, lora_A = R). PEFT does *not* divide by scaling, so its
initialisation reproduces W only when lora_alpha == r; we divide (as PEFT's and our PiSSA do),
so it holds for any lora_alpha. PEFT quantises without double quantisation inside the loop; we
use the layer's own options, so the loop sees exactly the base the model will use.

Chapter: chapters/05-lora-and-qlora.ipynb
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import statistics
from dataclasses import dataclass

from minilora import backend
from minilora.backend import xp
from minilora.checkpoint import load_checkpoint
from minilora.methods.lora.config import LoraConfig
from minilora.config import QUANT_TYPES, ConfigError, QuantConfig, option
from minilora.errors import PeftError, UsageError
from minilora.methods.base import Method, Tuned
from minilora.io import CheckpointError, config_from_meta, read_typed, write_typed
from minilora.methods.lora import (
    LoRAError,
    LoRALinear,
    load_lora_state_dict,
    lora_layers,
    lora_state_dict,
    mark_only_lora_as_trainable,
)
from minilora.methods.lora.layers import check_rank
from minilora.nn.layers import Linear, Module
from minilora.nn.modules_to_save import (
    check_saved_modules,
    load_saved_modules,
    saved_modules_tensors,
    split_saved_modules,
)
from minilora.quant.linear import (
    QuantLinear,
    QuantWeight,
    check_finite_weight,
    quant_linear_backward,
    quant_linear_forward,
    quant_weights,
    quantized_parameter_count,
)
from minilora.quant.loftq import loftq_init
from minilora.quant.model_quant import QUANT_TARGETS

QLORA_ADAPTER_FORMAT = "minilora-qlora-adapter-v1"


# ----------------------------------------------------------------------------------------------
# the layer
# ----------------------------------------------------------------------------------------------
class QLoRALinear(LoRALinear):
    """:class:`~minilora.methods.lora.LoRALinear` over a frozen 4-bit weight.

    out = x @ dequant(Q).T + b + scaling * (dropout(x) @ A.T) @ B.T       (..., d_out)

    Parameters: ``lora_A`` (r, d_in), ``lora_B`` (d_out, r) (float32, trainable) and the base's
    ``bias`` (d_out,) (adopted from the :class:`QuantLinear`). The weight is ``qweight``, not a
    parameter. Merging is refused: folding ΔW into 4-bit codes means re-quantising W0 + ΔW,
    which changes the outputs (PEFT warns about this); evaluate unmerged instead.

    Args:
        base: the :class:`QuantLinear` to wrap. The other arguments are LoRALinear's;
        ``init_lora_weights`` may not be "pissa" (needs a float W0) or "loftq" (use
        :func:`loftq_init` / :func:`inject_qlora`, which also choose the codes).

    Chapter: chapters/05-lora-and-qlora.ipynb
    """

    kind = "QLoRALinear"

    def __init__(self, base: QuantLinear, r: int, lora_alpha: float = 8,
                 lora_dropout: float = 0.0, use_rslora: bool = False, init_lora_weights=True,
                 rng=0, dropout_rng=None):
        if not isinstance(base, QuantLinear):
            raise TypeError(f"QLoRALinear wraps a QuantLinear (4-bit weight), got "
                            f"{type(base).__name__}; wrap a float Linear with LoRALinear")
        if init_lora_weights in ("pissa", "loftq"):
            raise LoRAError(f"QLoRALinear: init_lora_weights={init_lora_weights!r} must be done "
                            "before quantising (it changes W0); use inject_qlora with "
                            "init_lora_weights='loftq', or LoRALinear for 'pissa'")
        # LoRALinear's checks and factor init need only W0's shape and dtype: it is given a
        # float Linear of the dequantised weight, which is dropped again right after.
        super().__init__(Linear(base.qweight.dequantize(), base.params.get("bias")), r,
                         lora_alpha, lora_dropout, use_rslora, init_lora_weights, rng,
                         dropout_rng)
        del self.params["weight"]
        self.qweight = base.qweight

    @property
    def d_in(self) -> int:
        return self.qweight.shape[1]

    @property
    def d_out(self) -> int:
        return self.qweight.shape[0]

    def buffer_bytes(self) -> int:
        """Bytes of the 4-bit W0 (see :meth:`minilora.quant.linear.QuantLinear.buffer_bytes`)."""
        return self.qweight.nbytes()["total"]

    def _base_forward(self, x):
        """``x @ dequant(Q).T + b``; the cache keeps the packed weight, not its float copy."""
        return quant_linear_forward(x, self.qweight, self.params.get("bias"))

    def _base_backward(self, dout, cache, need_dx: bool):
        """``dx = dout @ dequant(Q)`` (dequantised again) and db if the bias trains; no dW."""
        dx, db = quant_linear_backward(dout, cache, need_dx, self.needs_grad("bias"))
        self._accumulate("bias", db)
        return dx

    def merge(self, safe_merge: bool = False) -> None:
        raise LoRAError("QLoRALinear cannot merge: W0 is stored as 4-bit codes, and folding ΔW "
                        "in would re-quantise W0 + ΔW (a different model). Run the adapter "
                        "unmerged, or dequantise the base into a float LoRA model first")


# ----------------------------------------------------------------------------------------------
# whole model
# ----------------------------------------------------------------------------------------------
def block_linears(model: Module) -> list:
    """Names of the block linears a 4-bit base quantises (tree order)."""
    return [n for n, m in model.named_modules()
            if n.startswith("blocks.") and n.rsplit(".", 1)[-1] in QUANT_TARGETS
            and isinstance(m, Linear)]


def _digest(arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(backend.to_numpy(a).tobytes())
    return h.hexdigest()


def inject_qlora(model: Module, config: LoraConfig, quant: QuantConfig | None = None) -> dict:
    """Quantise every block linear of ``model`` to 4 bits and wrap the targets with LoRA.

    Non-target block linears become :class:`QuantLinear` (frozen, 4-bit); targets become
    :class:`QLoRALinear`. Factors for the default inits are drawn from one CPU generator seeded
    with ``config.seed`` in tree order, exactly as :func:`minilora.methods.lora.inject_lora` draws them,
    so a LoRA and a QLoRA model built with one config start from the same A. With
    ``init_lora_weights="loftq"`` each target runs :func:`loftq_init` (T = ``quant.loftq_iter``)
    and starts with ``dequant(Q_T) + scaling B A`` instead of ``dequant(quant(W))``.

    Args:
        model: a float :class:`minilora.model.GPT` without LoRA layers.
        config: the LoRA config; targets must be block linears (q, k, v, o, up, down).
        quant: the 4-bit format (default :class:`QuantConfig`: NF4, blocksize 64, double quant).
    Returns:
        report dict: trainable / total float parameters, quantized_params, targets, bytes
        (float32 weights before, 4-bit bytes after), ``relative_quant_error`` = ||W - dequant(Q)||
        / ||W|| over all 4-bit matrices (Q alone: for LoftQ targets Q + s B A is the
        approximation and Q by itself is further from W), the
        digests of the float base and of the codes (for adapter files), and for LoftQ the
        per-layer residual norms.
    Raises:
        LoRAError: LoRA layers already present, or a target outside the blocks;
        ValueError: NaN/inf weights (naming the layer); ConfigError: a bad rank.

    Chapter: chapters/05-lora-and-qlora.ipynb
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a LoraConfig, got {type(config).__name__}")
    if config.use_dora:
        raise LoRAError("QLoRA does not combine with use_dora: DoRA normalises the float W0, which "
                        "a 4-bit base does not keep; use LoraConfig(use_dora=False) or method 'dora'")
    quant = quant or QuantConfig()
    if not isinstance(quant, QuantConfig):
        raise TypeError(f"quant must be a QuantConfig, got {type(quant).__name__}")
    if lora_layers(model) or quant_weights(model):
        raise LoRAError("the model already has LoRA or 4-bit layers; inject_qlora needs the "
                        "float base model (load it again)")
    outside = [t for t in config.target_modules if t not in QUANT_TARGETS]
    if outside:
        raise LoRAError(f"QLoRA adapts the 4-bit block linears {', '.join(QUANT_TARGETS)}; "
                        f"{outside} stay float32 in the base (embeddings and LM head are not "
                        "quantised): use --method lora for them")
    if config.init_lora_weights == "pissa":
        raise LoRAError("init_lora_weights='pissa' is not available for QLoRA (use 'loftq', "
                        "the quantisation-aware split of W0)")
    modules = dict(model.named_modules())
    names = block_linears(model)
    if not names:
        raise LoRAError("the model has no block linears (blocks.*.attn.q/k/v/o, mlp.up/down) "
                        "to quantise")
    targets = [n for n in names if n.rsplit(".", 1)[-1] in config.target_modules]
    for name in names:  # every check before anything changes
        w = modules[name].params["weight"]
        check_finite_weight(w, f"{name}.weight")
        if name in targets:
            check_rank(config.r, w.shape[1], w.shape[0], f"{name!r} (weight shape "
                        f"{tuple(w.shape)})")
    base_digest = _digest(modules[n].params["weight"] for n in names)
    rng = backend.cpu_rng(config.seed)
    loftq = config.init_lora_weights == "loftq"
    float_bytes = q_bytes = 0
    err2 = norm2 = 0.0
    residuals = {}
    for name in names:
        old = modules[name]
        w = old.params["weight"]
        float_bytes += 4 * int(w.size)
        if loftq and name in targets:
            res = loftq_init(w, config.r, quant.loftq_iter, quant.quant_type, quant.blocksize,
                             quant.double_quant, config.scaling, name=f"{name}.weight")
            qweight = res.qweight
            residuals[name] = {"weight_norm": res.weight_norm,
                               "quant_error_norm": res.quant_error_norm,
                               "residual_norms": res.residual_norms}
        else:
            qweight = QuantWeight.quantize(w, quant.quant_type, quant.blocksize,
                                           quant.double_quant, name=f"{name}.weight")
        qweight.keep_dequantized = quant.keep_dequantized
        w_hat = qweight.dequantize()
        err2 += float(xp.sum((w_hat - w.astype(w_hat.dtype)) ** 2))
        norm2 += float(xp.sum(w.astype(xp.float64) ** 2))
        q_bytes += qweight.nbytes()["packed"] + qweight.nbytes()["scales"]
        new = QuantLinear(qweight, old.params.get("bias"))
        if name in targets:
            new = QLoRALinear(new, config.r, config.lora_alpha, config.lora_dropout,
                              config.use_rslora, True if loftq else config.init_lora_weights,
                              rng=rng)
            if loftq:
                new.params["lora_A"] = backend.asarray(res.A, dtype=new.params["lora_A"].dtype)
                new.params["lora_B"] = backend.asarray(res.B, dtype=new.params["lora_B"].dtype)
        parent, _, child = name.rpartition(".")
        modules[parent].replace(child, new)
    mark_only_lora_as_trainable(model, config.bias)
    trainable, total = model.num_parameters(trainable_only=True), model.num_parameters()
    report = {
        "trainable": trainable, "total_float": total,
        "quantized_params": quantized_parameter_count(model), "targets": targets,
        "quantized_layers": len(names), "base_weight_bytes_float32": float_bytes,
        "base_weight_bytes_4bit": q_bytes, "bits_per_quantized_param": 8 * q_bytes / (float_bytes / 4),
        "relative_quant_error": math.sqrt(err2 / norm2),
        "base_digest": base_digest, "quant_digest": quant_digest(model),
    }
    if loftq:
        report["loftq"] = {"n_iter": quant.loftq_iter, "layers": residuals,
                           "mean_relative_residual": [
                               statistics.fmean(v["residual_norms"][t] / v["weight_norm"]
                                                for v in residuals.values())
                               for t in range(quant.loftq_iter)],
                           "mean_relative_quant_error": statistics.fmean(
                               v["quant_error_norm"] / v["weight_norm"]
                               for v in residuals.values())}
    return report


def quant_digest(model: Module) -> str:
    """sha256 over every 4-bit layer's codes and scales (tree order, names included)."""
    h = hashlib.sha256()
    for name, q in quant_weights(model).items():
        h.update(name.encode())
        h.update(q.digest().encode())
    return h.hexdigest()


def save_qlora_adapter(path, model: Module, config: LoraConfig, quant: QuantConfig,
                       base_digest: str | None = None, modules_to_save=()) -> None:
    """Write the adapter alone (LoRA factors + selected biases) and how to rebuild the base.

    The JSON header holds the LoraConfig, the QuantConfig, the model config, and two sha256
    digests: of the float base weights that were quantised (``base_digest``, from
    :func:`inject_qlora`'s report) and of the resulting codes (``quant_digest``). Quantisation
    (and LoftQ) is deterministic, so :func:`load_qlora_adapter` rebuilds the same 4-bit base from
    the same float base and checks both. Atomic (:func:`minilora.io.write_typed`).
    ``modules_to_save``: module paths trained whole beside the factors, stored in the same file
    (see :mod:`minilora.nn.modules_to_save`).

    Chapter: chapters/05-lora-and-qlora.ipynb
    """
    layers = lora_layers(model)
    if not layers or not all(isinstance(m, QLoRALinear) for m in layers.values()):
        raise LoRAError("save_qlora_adapter: the model has no QLoRA layers (use inject_qlora; "
                        "a float LoRA model is saved with save_adapter)")
    meta = {"lora_config": config.to_dict(),
            "quant_config": quant.to_dict(), "targets": list(layers),
            "base_digest": base_digest, "quant_digest": quant_digest(model),
            "modules_to_save": list(modules_to_save)}
    model_config = getattr(model, "config", None)
    if model_config is not None and hasattr(model_config, "to_dict"):
        meta["model_config"] = model_config.to_dict()
    arrays = {**lora_state_dict(model, config.bias), **saved_modules_tensors(model, modules_to_save)}
    write_typed(path, QLORA_ADAPTER_FORMAT, arrays, meta)


def load_qlora_into(path, model, base_name="the base", allow_nonfinite: bool = False):
    """Quantise the float base GPT ``model`` as the adapter's QuantConfig says, check that the
    rebuilt 4-bit base is the one the adapter was trained on, and load the adapter into it;
    returns ``(LoraConfig, QuantConfig, the module paths saved whole, inject_qlora's report)``.

    Chapter: chapters/05-lora-and-qlora.ipynb
    """
    arrays, meta = read_typed(path, QLORA_ADAPTER_FORMAT, "QLoRA adapter", allow_nonfinite)
    config = config_from_meta(path, meta, "lora_config", LoraConfig, "QLoRA adapter")
    quant = config_from_meta(path, meta, "quant_config", QuantConfig, "QLoRA adapter")
    report = inject_qlora(model, config, quant)
    if meta.get("base_digest") not in (None, report["base_digest"]):
        raise CheckpointError(f"QLoRA adapter {str(path)!r} was trained on another base: the "
                              f"float weights of {base_name} do not match its base_digest")
    if meta.get("quant_digest") != report["quant_digest"]:
        raise CheckpointError(f"QLoRA adapter {str(path)!r}: the 4-bit base rebuilt from "
                              f"{base_name} differs from the one it was trained on "
                              "(quant_digest mismatch)")
    arrays, saved, paths = split_saved_modules(arrays)
    check_saved_modules(model, paths, saved, str(path), error=CheckpointError)
    load_lora_state_dict(model, arrays)
    if paths:
        load_saved_modules(model, paths, saved, str(path), error=CheckpointError)
    return config, quant, paths, report


def load_qlora_adapter(path, base_path, allow_nonfinite: bool = False):
    """Rebuild the 4-bit base from the float base checkpoint and load the adapter into it.

    Args:
        path: a file from :func:`save_qlora_adapter`.
        base_path: the float base checkpoint the adapter was trained on.
        allow_nonfinite: load NaN/inf tensors anyway (debugging only).
    Returns:
        (model, tokenizer, LoraConfig, QuantConfig).
    Raises:
        CheckpointError: not a QLoRA adapter, or the rebuilt base differs (another base
        checkpoint, or a quantisation that did not reproduce the codes).

    Chapter: chapters/05-lora-and-qlora.ipynb
    """
    model, tok, _ = load_checkpoint(base_path)
    config, quant, _, _ = load_qlora_into(path, model, repr(str(base_path)), allow_nonfinite)
    return model, tok, config, quant


# ----------------------------------------------------------------------------------------------
# the method: its config (LoRA's fields + the 4-bit base's) and the interface
# ----------------------------------------------------------------------------------------------
_QUANT_FIELDS = tuple(f.name for f in dataclasses.fields(QuantConfig))
_LORA_FIELDS = tuple(f.name for f in dataclasses.fields(LoraConfig))


@dataclass(frozen=True)
class QLoraConfig(LoraConfig):
    """QLoRA's options: LoRA's (:class:`LoraConfig`) and the 4-bit base's
    (:class:`~minilora.config.QuantConfig`) in one config; ``.lora`` and ``.quant`` give them
    apart. ``use_dora`` is refused (DoRA needs the float W0 to normalise)."""

    quant_type: str = option("nf4", "4-bit code of the frozen base", choices=QUANT_TYPES)
    blocksize: int = option(64, "weights per absmax block", range=(1, None))
    double_quant: bool = option(True, "8-bit block scales (--no-double-quant: float32 scales, "
                                "4.5 instead of 4.127 bits per weight)")
    loftq_iter: int = option(5, "--init loftq: alternating steps T (PEFT: 1)", range=(1, None))
    keep_dequantized: bool = option(False, "cache the dequantised weights (faster, gives up the "
                                    "memory saving)", cli=False)

    def __post_init__(self):
        super().__post_init__()
        if self.use_dora:
            raise ConfigError("method 'qlora' does not combine with use_dora (DoRA needs the float "
                              "W0 to normalise); use method 'dora' on the float base")
        self.quant  # validated as a QuantConfig

    @property
    def lora(self) -> LoraConfig:
        return LoraConfig(**{k: getattr(self, k) for k in _LORA_FIELDS})

    @property
    def quant(self) -> QuantConfig:
        return QuantConfig(**{k: getattr(self, k) for k in _QUANT_FIELDS})

    @classmethod
    def from_parts(cls, lora: LoraConfig, quant: QuantConfig | None = None):
        quant = quant or QuantConfig()
        return cls(**{k: getattr(lora, k) for k in _LORA_FIELDS},
                   **{k: getattr(quant, k) for k in _QUANT_FIELDS})


class QLoraMethod(Method):
    """QLoRA: the float base quantised to 4 bits (NF4 + double quantisation), LoRA around it."""

    name = "qlora"
    example = "--init loftq"
    config_cls = QLoraConfig
    summary = "QLoRA: LoRA around a base held as 4-bit NF4 codes (--init loftq: LoftQ)"
    weights_file = "adapter.safetensors"
    file_format = QLORA_ADAPTER_FORMAT
    lr = (5e-3, 5e-4)
    # the float base, kept for the harness's *_base figures: forgetting is measured from the
    # model one had before quantising (the 4-bit model at step 0 is reported as *_init)
    base_differs = "copy"

    def default_config(self, steps=None):
        return QLoraConfig(r=8, lora_alpha=16, target_modules=("q", "v"))

    def check_config(self, config):
        """Also a :class:`LoraConfig` (default QuantConfig) or a ``(LoraConfig, QuantConfig)``
        pair."""
        if isinstance(config, tuple) and len(config) == 2:
            lora, quant = config
            lora = lora or self.default_config().lora
            if isinstance(lora, LoraConfig) and lora.use_dora:
                raise UsageError("method 'qlora' does not combine with use_dora (DoRA needs the "
                                 "float W0 to normalise); use method 'dora' on the float base")
            if not isinstance(lora, LoraConfig) or not isinstance(quant or QuantConfig(),
                                                                  QuantConfig):
                raise UsageError("method 'qlora' needs a QLoraConfig, a LoraConfig or a "
                                 f"(LoraConfig, QuantConfig) pair; got {type(config).__name__}")
            return QLoraConfig.from_parts(lora, quant)
        if type(config) is LoraConfig:
            if config.use_dora:
                raise UsageError("method 'qlora' does not combine with use_dora (DoRA needs the "
                                 "float W0 to normalise); use method 'dora' on the float base")
            return QLoraConfig.from_parts(config)
        return super().check_config(config)

    def _apply(self, model, config) -> Tuned:
        return Tuned(model, config, self, report=inject_qlora(model, config.lora, config.quant))

    def record(self, tuned: Tuned) -> dict:
        """result.json's method_config: the LoRA and quant configs apart, and the base report."""
        report = tuned.report or {}
        base = {k: v for k, v in report.items() if k != "loftq"}
        if "loftq" in report:
            base["loftq"] = {k: v for k, v in report["loftq"].items() if k != "layers"}
        return {"lora": tuned.config.lora.to_dict(), "quant": tuned.config.quant.to_dict(),
                "base": base}

    def save(self, path, tuned: Tuned, tokenizer=None) -> None:
        save_qlora_adapter(path, tuned.model, tuned.config.lora, tuned.config.quant,
                           (tuned.report or {}).get("base_digest"), tuned.modules_to_save)

    def load(self, path, model) -> Tuned:
        config, quant, paths, report = load_qlora_into(path, model)
        return Tuned(model, QLoraConfig.from_parts(config, quant), self, tuple(paths),
                     report=report)

    def export_peft(self, path_dir, tuned: Tuned, base_model_name_or_path=None):
        raise PeftError("a QLoRA adapter is not exported to PEFT's format: its factors belong "
                        "to the 4-bit base minilora rebuilt (with LoftQ, a base other than "
                        "quantise(W0)); merge it or train with method 'lora' to export")


QLORA = QLoraMethod()
