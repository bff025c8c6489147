"""Bad input gets a ValueError naming what is wrong and what was expected; never a silent wrong result."""
import json

import pytest
import torch

from nf4 import QuantizedWeight4bit, dequantize_4bit, from_bnb_state_dict, load_quantized, quantize_4bit


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.uint8, torch.float64, torch.bool])
def test_non_float_or_unsupported_dtype(dtype):
    with pytest.raises(ValueError, match="float32, float16 or bfloat16.*" + str(dtype).replace("torch.", "")):
        quantize_4bit(torch.zeros(64, dtype=dtype))


@pytest.mark.parametrize("blocksize", [0, 16, 48, 100, 8192, -64])
def test_blocksize_outside_allowed_set(blocksize):
    with pytest.raises(ValueError, match=f"blocksize must be one of .*got {blocksize}"):
        quantize_4bit(torch.randn(128), blocksize)


def test_quant_type_unknown():
    with pytest.raises(ValueError, match="quant_type must be one of .*'int4'"):
        quantize_4bit(torch.randn(128), 64, "int4")


def test_empty_tensor():
    with pytest.raises(ValueError, match="empty tensor"):
        quantize_4bit(torch.empty(0, 64))


def test_dequantize_shape_mismatch():
    packed, absmax = quantize_4bit(torch.randn(128), 64)
    with pytest.raises(ValueError, match="expected 32 bytes for shape \\(8, 8\\), got 64"):
        dequantize_4bit(packed, absmax, (8, 8))
    with pytest.raises(ValueError, match="absmax: expected 4 blocks"):
        dequantize_4bit(packed, absmax, (128,), 32)


def _sd(double_quant=False):
    return QuantizedWeight4bit.from_tensor(torch.randn(16, 8), 64, "nf4", double_quant).to_bnb_state_dict("w")


@pytest.mark.parametrize("key", ["w", "w.absmax", "w.quant_map", "w.nested_absmax", "w.nested_quant_map"])
def test_state_dict_missing_key(key):
    sd = _sd(double_quant=True)
    del sd[key]
    with pytest.raises(ValueError, match=f"missing key '{key}'"):
        from_bnb_state_dict(sd, "w")


def test_state_dict_missing_quant_state():
    sd = _sd()
    del sd["w.quant_state.bitsandbytes__nf4"]
    with pytest.raises(ValueError, match="expected exactly one key w.quant_state.bitsandbytes__"):
        from_bnb_state_dict(sd, "w")


def test_blob_that_does_not_parse():
    sd = _sd()
    sd["w.quant_state.bitsandbytes__nf4"] = torch.tensor(list(b"{not json"), dtype=torch.uint8)
    with pytest.raises(ValueError, match="does not hold a JSON quant state"):
        from_bnb_state_dict(sd, "w")


@pytest.mark.parametrize("field,value,message", [
    ("quant_type", "fp4", "says quant_type 'fp4'; expected 'nf4'"),
    ("dtype", "int8", "has dtype 'int8'"),
    ("shape", [16, -8], "has shape"),
    ("blocksize", 48, "blocksize must be one of"),
    ("shape", [16, 9], "expected 72 elements for shape|packed codes must be uint8 with 72"),
])
def test_blob_with_bad_fields(field, value, message):
    sd = _sd()
    meta = json.loads(bytes(sd["w.quant_state.bitsandbytes__nf4"].tolist()))
    meta[field] = value
    sd["w.quant_state.bitsandbytes__nf4"] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    with pytest.raises(ValueError, match=message):
        from_bnb_state_dict(sd, "w")


def test_blob_missing_field():
    sd = _sd()
    meta = json.loads(bytes(sd["w.quant_state.bitsandbytes__nf4"].tolist()))
    del meta["shape"]
    sd["w.quant_state.bitsandbytes__nf4"] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    with pytest.raises(ValueError, match="lacks field 'shape'"):
        from_bnb_state_dict(sd, "w")


def test_wrong_absmax_dtype():
    sd = _sd()
    sd["w.absmax"] = sd["w.absmax"].half()
    with pytest.raises(ValueError, match="'w.absmax' must be a torch.float32 tensor"):
        from_bnb_state_dict(sd, "w")


def test_corrupt_and_missing_files(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{truncated")
    with pytest.raises(ValueError, match="bad.safetensors: not a readable safetensors file"):
        load_quantized(str(bad))
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_quantized(str(tmp_path / "nope.safetensors"))
