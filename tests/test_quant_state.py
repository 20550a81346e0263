"""QuantState: tensors + metadata round trip, safetensors/JSON files, atomic writes, validation."""
import json
import os

import numpy as np
import pytest
import safetensors.numpy

from minilora.quant import nf4 as N
from minilora.quant import state as S
from minilora.quant.state import QuantState


@pytest.fixture(params=["nf4", "fp4", "nf4+dq"])
def quantized(request, rng):
    x = rng.standard_normal((37, 29)).astype(np.float32)
    quant_type = request.param.split("+")[0]
    packed, state = N.quantize_4bit(x, N.get_code(quant_type), 64,
                                    double_quant=request.param.endswith("dq"),
                                    quant_type=quant_type)
    return x, packed, state


def assert_same_state(a: QuantState, b: QuantState):
    for name in ("shape", "blocksize", "quant_type", "dtype", "double_quant", "blocksize2"):
        assert getattr(a, name) == getattr(b, name), name
    for name in ("absmax", "code", "absmax2", "code2", "offset"):
        va, vb = getattr(a, name), getattr(b, name)
        assert (va is None) == (vb is None), name
        if va is not None:
            np.testing.assert_array_equal(va, vb, err_msg=name)
            assert np.asarray(va).dtype == np.asarray(vb).dtype, name


def test_tensors_and_meta_round_trip(quantized):
    x, packed, state = quantized
    tensors, meta = state.to_tensors_and_meta()
    json.dumps(meta)                                   # metadata is plain JSON
    assert set(tensors) == ({"absmax", "code", "absmax2", "code2"} if state.double_quant
                            else {"absmax", "code"})
    back = QuantState.from_tensors_and_meta(tensors, meta)
    assert_same_state(state, back)
    np.testing.assert_array_equal(N.dequantize_4bit(packed, back), N.dequantize_4bit(packed, state))


def test_save_load_round_trip(quantized, tmp_path):
    x, packed, state = quantized
    st_path, json_path = state.save(tmp_path / "layer0.weight")
    assert os.path.basename(st_path) == "layer0.weight.safetensors"
    assert os.path.basename(json_path) == "layer0.weight.json"
    with open(json_path) as f:
        meta = json.load(f)
    assert meta["quant_type"] == state.quant_type and meta["shape"] == [37, 29]
    back = QuantState.load(tmp_path / "layer0.weight")
    assert_same_state(state, back)
    np.testing.assert_array_equal(N.dequantize_4bit(packed, back), N.dequantize_4bit(packed, state))
    assert sorted(os.listdir(tmp_path)) == ["layer0.weight.json", "layer0.weight.safetensors"]


def test_offset_survives_json_exactly(rng, tmp_path):
    x = (0.02 * rng.standard_normal(5000)).astype(np.float32)
    _, state = N.quantize_nf4(x, double_quant=True)
    state.save(tmp_path / "w")
    back = QuantState.load(tmp_path / "w")
    assert back.offset.dtype == np.float32 and back.offset == state.offset


def test_failed_write_leaves_old_files(monkeypatch, rng, tmp_path):
    _, old = N.quantize_nf4(rng.standard_normal(100).astype(np.float32))
    _, new = N.quantize_nf4(rng.standard_normal(300).astype(np.float32), double_quant=True)
    prefix = tmp_path / "w"
    st_path, json_path = old.save(prefix)
    before = {p: open(p, "rb").read() for p in (st_path, json_path)}

    def fsync_fails(fd):  # the disk fills up while the new bytes are written
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", fsync_fails)
    with pytest.raises(OSError, match="disk full"):
        new.save(prefix)
    monkeypatch.undo()

    def fail_json(path, text):
        raise OSError("disk full")

    monkeypatch.setattr(S, "atomic_write_text", fail_json)
    with pytest.raises(OSError, match="disk full"):
        old.save(tmp_path / "other")            # fresh prefix: the safetensors half lands
    monkeypatch.undo()

    for p, content in before.items():
        assert open(p, "rb").read() == content, f"{p} was modified by a failed save"
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f], "temp files left behind"
    assert_same_state(old, QuantState.load(prefix))
    with pytest.raises(FileNotFoundError):      # the half-saved pair is not loadable
        QuantState.load(tmp_path / "other")


def test_load_detects_files_from_different_saves(rng, tmp_path):
    _, a = N.quantize_nf4(rng.standard_normal(100).astype(np.float32))
    _, b = N.quantize_nf4(rng.standard_normal(300).astype(np.float32))
    a.save(tmp_path / "a")
    b.save(tmp_path / "b")
    os.replace(tmp_path / "b.json", tmp_path / "a.json")
    with pytest.raises(ValueError, match="different saves"):
        QuantState.load(tmp_path / "a")


def _write_pair(prefix, tensors, meta):
    safetensors.numpy.save_file(tensors, str(prefix) + ".safetensors")
    with open(str(prefix) + ".json", "w") as f:
        json.dump(meta, f)


@pytest.mark.parametrize("edit, message", [
    (lambda t, m: m.pop("blocksize"), "missing key"),
    (lambda t, m: t.pop("code"), "missing \\['code'\\]"),
    (lambda t, m: t.update(extra=np.zeros(2, np.float32)), "unexpected \\['extra'\\]"),
    (lambda t, m: t.update(absmax=t["absmax"][:-1].copy()), "absmax must be \\(6,\\) float32"),
    (lambda t, m: m.update(shape=[7, 100]), "absmax must be \\(11,\\)"),
    (lambda t, m: m.update(blocksize=16), "absmax must be \\(22,\\)"),
    (lambda t, m: t.update(code=t["code"][:8].copy()), "code must have shape \\(16,\\)"),
    (lambda t, m: m.update(quant_type="nf5"), "quant_type"),
    (lambda t, m: m.update(format="something.else"), "not a minilora.QuantState"),
    (lambda t, m: m.update(shape="7x50"), "shape must be a list"),
    (lambda t, m: m.update(double_quant=True), "missing \\['absmax2', 'code2'\\]"),
])
def test_load_validation_errors(rng, tmp_path, edit, message):
    _, state = N.quantize_nf4(rng.standard_normal((7, 50)).astype(np.float32))
    tensors, meta = state.to_tensors_and_meta()
    edit(tensors, meta)
    _write_pair(tmp_path / "w", tensors, meta)
    with pytest.raises(ValueError, match=message):
        QuantState.load(tmp_path / "w")


@pytest.mark.parametrize("edit, message", [
    (lambda t, m: t.update(absmax2=np.zeros(5, np.float32)), "absmax2 must be \\(1,\\)"),
    (lambda t, m: t.update(absmax=t["absmax"].astype(np.float32)), "absmax must be .* uint8"),
    (lambda t, m: t.update(code2=t["code2"][:16].copy()), "code2 must have shape \\(256,\\)"),
    (lambda t, m: m.update(offset=None), "offset must be a number"),
])
def test_double_quant_validation_errors(rng, tmp_path, edit, message):
    _, state = N.quantize_nf4(rng.standard_normal(1000).astype(np.float32), double_quant=True)
    tensors, meta = state.to_tensors_and_meta()
    edit(tensors, meta)
    _write_pair(tmp_path / "w", tensors, meta)
    with pytest.raises(ValueError, match=message):
        QuantState.load(tmp_path / "w")


def test_unreadable_files(tmp_path, rng):
    _, state = N.quantize_nf4(rng.standard_normal(10).astype(np.float32))
    state.save(tmp_path / "w")
    (tmp_path / "w.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        QuantState.load(tmp_path / "w")
    state.save(tmp_path / "w")
    (tmp_path / "w.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(ValueError, match="not a readable safetensors"):
        QuantState.load(tmp_path / "w")


def test_validate_lists_every_problem():
    state = QuantState(absmax=np.zeros(3, np.float32), shape=(10,), code=np.zeros(16, np.float32),
                       blocksize=4, quant_type="nf4", dtype="float32", offset=1.0)
    with pytest.raises(ValueError, match="offset is set"):
        state.validate()
    bad = QuantState(absmax=np.zeros(3, np.float32), shape=(10,), code=np.zeros(15, np.float32),
                     blocksize=4, quant_type="q4", dtype="int8")
    with pytest.raises(ValueError) as info:
        bad.validate()
    msg = str(info.value)
    assert "quant_type" in msg and "dtype" in msg and "code must have shape (16,)" in msg
