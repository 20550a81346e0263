"""Regenerate tests/data/bnb_nf4_golden.npz from the real bitsandbytes (CPU).

Needs torch + bitsandbytes, which minilora itself does not; run it in a throwaway venv:

    python3 -m venv /tmp/bnbvenv
    /tmp/bnbvenv/bin/pip install numpy scipy bitsandbytes==0.50.0 torch==2.13.0
    /tmp/bnbvenv/bin/python tests/data/make_bnb_nf4_golden.py

For each case it stores the float32 input, bnb's packed NF4 / FP4 bytes and absmax, the NF4
dequantisation, and the double-quantised (compress_statistics=True) absmax codes, nested absmax
and offset. tests/test_quant_nf4.py and tests/test_quant_double.py compare minilora against it.
"""
import os

import bitsandbytes
import bitsandbytes.functional as F
import numpy as np
import torch

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bnb_nf4_golden.npz")


def cases():
    rng = np.random.default_rng(20260823)
    yield "randn_128x64", rng.standard_normal((128, 64)).astype(np.float32)
    # odd n and a partial last block
    yield "randn_33x7", rng.standard_normal((33, 7)).astype(np.float32)
    yield "randn_7", rng.standard_normal(7).astype(np.float32)          # one partial block
    # weight-like scale; 263 blocks = 2 second-level blocks; row 1 gives an all-zero block
    w = (0.02 * rng.standard_normal((129, 130))).astype(np.float32)
    w[1, :] = 0.0
    yield "weights_129x130", w
    yield "heavy_tail_3x1000", rng.standard_t(3, size=(3, 1000)).astype(np.float32)


def main():
    out = {"bnb_version": np.array(bitsandbytes.__version__),
           "torch_version": np.array(torch.__version__),
           "nf4_code": F.get_4bit_type("nf4", device="cpu").numpy(),
           "fp4_code": F.get_4bit_type("fp4", device="cpu").numpy(),
           "dynamic_map": F.create_dynamic_map().numpy()}
    names = []
    for name, x in cases():
        names.append(name)
        t = torch.from_numpy(x)
        out[f"{name}/x"] = x
        for qt in ("nf4", "fp4"):
            packed, st = F.quantize_4bit(t, blocksize=64, quant_type=qt)
            out[f"{name}/{qt}_packed"] = packed.numpy().reshape(-1)
            out[f"{name}/{qt}_absmax"] = st.absmax.numpy()
            if qt == "nf4":
                out[f"{name}/nf4_dequant"] = F.dequantize_4bit(packed, st).numpy().reshape(x.shape)
        packed, st = F.quantize_4bit(t, blocksize=64, quant_type="nf4", compress_statistics=True)
        out[f"{name}/dq_packed"] = packed.numpy().reshape(-1)
        out[f"{name}/dq_absmax_q8"] = st.absmax.numpy()
        out[f"{name}/dq_absmax2"] = st.state2.absmax.numpy()
        out[f"{name}/dq_offset"] = np.float32(st.offset.item())
        out[f"{name}/dq_dequant"] = F.dequantize_4bit(packed, st).numpy().reshape(x.shape)
    out["cases"] = np.array(names)
    np.savez_compressed(OUT, **out)
    print(f"wrote {OUT} (bitsandbytes {bitsandbytes.__version__}, torch {torch.__version__})")


if __name__ == "__main__":
    main()
