import json
import os

import pytest
import torch

from nf4 import QuantizedWeight4bit, from_bnb_state_dict, load_quantized, save_quantized, split_bnb_state_dict

from .conftest import assert_bits_equal


def test_bits_per_parameter_at_blocksize_64():
    w = torch.randn(1024, 1024)  # 16384 blocks: a whole number of 256-blocks, as in 7B matrices
    assert round(QuantizedWeight4bit.from_tensor(w, 64).bits_per_parameter(), 3) == 4.5
    assert round(QuantizedWeight4bit.from_tensor(w, 64, double_quant=True).bits_per_parameter(), 3) == 4.127


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantize_returns_original_shape_and_dtype(dtype, double_quant):
    w = (torch.randn(3, 5, 7) * 0.1).to(dtype)
    qw = QuantizedWeight4bit.from_tensor(w, 32, "nf4", double_quant)
    out = qw.dequantize()
    assert out.shape == w.shape and out.dtype == dtype
    # NF4 error bound per element: half the largest gap between levels (1 - 0.7230) / 2 of the block's
    # absmax, plus 2% for the 8-bit scales and the output dtype's rounding
    blocks = torch.nn.functional.pad(w.float().reshape(-1), (0, 128 - w.numel())).reshape(-1, 32).abs().amax(1)
    bound = blocks.repeat_interleave(32)[: w.numel()] * ((1 - 0.7230) / 2 + 0.02)
    assert torch.all((out.float() - w.float()).abs().reshape(-1) <= bound)


def test_moves_between_devices_without_changing_dtypes():
    qw = QuantizedWeight4bit.from_tensor(torch.randn(64, 48), 64, "fp4", True)
    moved = qw.to("cpu")
    assert moved.packed.dtype == torch.uint8 and moved.nested.absmax2.dtype == torch.float32
    assert moved.device.type == "cpu"
    assert_bits_equal(moved.dequantize(), qw.dequantize(), "moved weight")
    if torch.cuda.is_available():
        assert qw.cuda().device.type == "cuda"


@pytest.mark.parametrize("double_quant", [False, True])
def test_state_dict_keys_and_blob(double_quant):
    qw = QuantizedWeight4bit.from_tensor(torch.randn(10, 13, dtype=torch.bfloat16), 64, "nf4", double_quant)
    sd = qw.to_bnb_state_dict("layer.weight")
    expected = ["layer.weight", "layer.weight.absmax", "layer.weight.quant_map"]
    if double_quant:
        expected += ["layer.weight.nested_absmax", "layer.weight.nested_quant_map"]
    expected.append("layer.weight.quant_state.bitsandbytes__nf4")
    assert list(sd) == expected
    blob = json.loads(bytes(sd["layer.weight.quant_state.bitsandbytes__nf4"].tolist()))
    assert blob["quant_type"] == "nf4" and blob["blocksize"] == 64 and blob["dtype"] == "bfloat16"
    assert blob["shape"] == [10, 13]
    if double_quant:
        assert blob["nested_blocksize"] == 256 and blob["nested_dtype"] == "float32"
        assert blob["nested_offset"] == qw.nested.offset.item()
    back = from_bnb_state_dict(sd, "layer.weight")
    assert_bits_equal(back.dequantize(), qw.dequantize(), "round trip")


def test_save_and_load_file(tmp_path):
    weights = {"a.weight": QuantizedWeight4bit.from_tensor(torch.randn(33, 17), 64),
               "b.weight": QuantizedWeight4bit.from_tensor(torch.randn(8, 8, dtype=torch.float16), 32, "fp4", True)}
    path = str(tmp_path / "q.safetensors")
    save_quantized(weights, path, extra={"b.bias": torch.ones(8)})
    loaded = load_quantized(path)
    assert set(loaded) == {"a.weight", "b.weight"}
    for k in weights:
        assert_bits_equal(loaded[k].dequantize(), weights[k].dequantize(), k)
    weights["a.weight"].save(str(tmp_path / "one.safetensors"), prefix="w")
    assert QuantizedWeight4bit.load(str(tmp_path / "one.safetensors"), prefix="w").shape == (33, 17)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []


def test_split_model_state_dict():
    sd = {}
    sd.update(QuantizedWeight4bit.from_tensor(torch.randn(4, 64)).to_bnb_state_dict("l.weight"))
    sd["l.bias"] = torch.zeros(4)
    sd["norm.weight"] = torch.ones(64)
    quantized, rest = split_bnb_state_dict(sd)
    assert list(quantized) == ["l.weight"] and list(rest) == ["l.bias", "norm.weight"]


def test_failed_save_keeps_previous_file(tmp_path, monkeypatch):
    path = str(tmp_path / "q.safetensors")
    good = {"w": QuantizedWeight4bit.from_tensor(torch.randn(8, 8))}
    save_quantized(good, path)
    before = open(path, "rb").read()
    import safetensors.torch

    def boom(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError):
        save_quantized({"w": QuantizedWeight4bit.from_tensor(torch.randn(8, 8))}, path)
    assert open(path, "rb").read() == before
    assert sorted(os.listdir(tmp_path)) == ["q.safetensors"]
