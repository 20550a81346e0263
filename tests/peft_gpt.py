"""The tiny GPT of the real-PEFT fixtures (tests/data/peft/gpt_*), rebuilt in minilora from the
fixture's own base weights (imported by the DoRA / (IA)³ / AdaLoRA / modules_to_save tests)."""
from pathlib import Path

import numpy as np

from minilora import backend
from minilora.config import GPTConfig
from minilora.model import GPT

PEFT_DIR = Path(__file__).parent / "data" / "peft"
FIXTURE_GPT = GPTConfig(vocab_size=97, block_size=16, n_layer=2, n_head=2, n_embd=16, bias=True)


def reference(name: str) -> dict:
    with np.load(PEFT_DIR / name / "reference.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def fixture_gpt(ref: dict) -> GPT:
    """A float64 minilora GPT holding the fixture's base weights."""
    model = GPT(FIXTURE_GPT, rng=None, dtype="float64")
    model.load_state_dict({k[len("base/"):]: backend.asarray(v) for k, v in ref.items()
                           if k.startswith("base/")})
    return model


def logits_of(model, ref: dict) -> np.ndarray:
    logits, _ = model.forward(backend.asarray(ref["input_ids"]))
    return backend.to_numpy(logits)
