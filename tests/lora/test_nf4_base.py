"""LoRA over 4-bit (NF4) base linears: forward/gradients, parameter counts as peft's, adapter files, merging
into a re-quantized NF4 base with the quantization error reported.

Runs against kernels.NF4Linear when it exists, and always against `RefNF4Linear`, a stand-in with the
interface of docs/CONTRACTS.md built on nf4.QuantizedWeight4bit (y = x @ deq(Q).T + b)."""
import io
from contextlib import redirect_stdout

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lora import (LoraConfig, count_parameters, inject_lora, lora_layers, merge_and_unload, save_adapter,
                  trainable_parameters_report)
from .lora_testlib import assert_close, bnb_quantize, peft, randomize_lora, tiny_llama, tokens

nf4 = pytest.importorskip("nf4")


class RefNF4Linear(nn.Module):
    """kernels.NF4Linear's contract on the pure-torch reference: qweight, bias, in/out_features, from_weight."""

    def __init__(self, qweight, bias=None, compute_dtype=None):
        super().__init__()
        self.qweight, self.compute_dtype = qweight, compute_dtype
        self.out_features, self.in_features = qweight.shape
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_weight(cls, weight, bias=None, blocksize=64, quant_type="nf4", double_quant=False, compute_dtype=None):
        qw = nf4.QuantizedWeight4bit.from_tensor(weight.detach(), blocksize, quant_type, double_quant)
        return cls(qw, bias, compute_dtype)

    @classmethod
    def from_linear(cls, linear, **kw):
        return cls.from_weight(linear.weight, linear.bias, **kw)

    def forward(self, x):
        return F.linear(x, self.qweight.dequantize(x.dtype), self.bias)


NF4_CLASSES = [RefNF4Linear]
try:
    from kernels import NF4Linear
    NF4_CLASSES.append(NF4Linear)
except ImportError:
    pass


def quantize_model(model, cls, double_quant=False):
    """Every linear but lm_head -> cls (NF4, blocksize 64), as llama.checkpoint.load_model(quantize='nf4') does."""
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and not name.endswith("lm_head"):
            parent, _, child = name.rpartition(".")
            q = cls.from_weight(m.weight.detach(), m.bias, blocksize=64, quant_type="nf4",
                                double_quant=double_quant, compute_dtype=torch.float32)
            setattr(model.get_submodule(parent), child, q)
    return model


def dequantized_twin(qmodel):
    """A dense copy whose linears hold the dequantized NF4 weights (what the 4-bit model computes)."""
    dense = tiny_llama(**{"attention_bias": qmodel.config.attention_bias})
    sd = {}
    for name, m in qmodel.named_modules():
        if getattr(m, "qweight", None) is not None:
            sd[name.replace(".base_layer", "") + ".weight"] = m.qweight.dequantize(torch.float32)
    dense.load_state_dict(sd, strict=False)
    for k, v in qmodel.state_dict().items():  # biases, norms, embeddings
        k2 = k.replace(".base_layer", "")
        if k2 in dense.state_dict() and "lora_" not in k and v.dtype.is_floating_point and k2 not in sd:
            dense.state_dict()[k2].copy_(v)
    return dense.eval()


@pytest.mark.parametrize("cls", NF4_CLASSES, ids=lambda c: c.__name__)
def test_lora_over_nf4_matches_dense_dequantized_model(cls):
    kw = dict(r=4, lora_alpha=8, target_modules="all-linear")
    qmodel = inject_lora(quantize_model(tiny_llama(attention_bias=True), cls, double_quant=True), LoraConfig(**kw))
    randomize_lora(qmodel)
    assert all(isinstance(l.base_layer, cls) for _, l in lora_layers(qmodel)) and len(list(lora_layers(qmodel))) == 14
    dense = dequantized_twin(qmodel)
    inject_lora(dense, LoraConfig(**kw))
    dense.load_state_dict({k: v for k, v in qmodel.state_dict().items() if "lora_" in k}, strict=False)
    ids = tokens()
    a, b = qmodel(input_ids=ids, labels=ids), dense(input_ids=ids, labels=ids)
    assert_close(a.logits, b.logits, 1e-5, "NF4 + LoRA vs dequantized dense + LoRA")
    a.loss.backward()
    b.loss.backward()
    dense_params = dict(dense.named_parameters())
    trainable = [(k, p) for k, p in qmodel.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in k for k, _ in trainable)
    for k, p in trainable:
        assert_close(p.grad, dense_params[k].grad, 1e-5, f"grad of {k}")


@pytest.mark.parametrize("cls", NF4_CLASSES, ids=lambda c: c.__name__)
def test_parameter_count_as_peft_counts_bitsandbytes_4bit(cls):
    """peft counts a bitsandbytes Params4bit as numel * 2 (two codes per byte) = the original weight's numel."""
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    ours = inject_lora(quantize_model(tiny_llama(), cls), LoraConfig(**kw))
    hf = bnb_quantize(tiny_llama())
    theirs = peft.get_peft_model(hf, peft.LoraConfig(**kw))
    buf = io.StringIO()
    with redirect_stdout(buf):
        theirs.print_trainable_parameters()
    assert trainable_parameters_report(ours) == buf.getvalue().strip()
    dense = inject_lora(tiny_llama(), LoraConfig(**kw))
    assert count_parameters(ours) == count_parameters(dense)


@pytest.mark.parametrize("cls", NF4_CLASSES, ids=lambda c: c.__name__)
def test_qlora_adapter_loads_in_peft_on_the_dequantized_model(cls, tmp_path):
    qmodel = inject_lora(quantize_model(tiny_llama(), cls), LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM"))
    randomize_lora(qmodel)
    save_adapter(qmodel, str(tmp_path))
    theirs = peft.PeftModel.from_pretrained(dequantized_twin(qmodel), str(tmp_path)).eval()
    ids = tokens()
    with torch.no_grad():
        assert_close(qmodel(ids).logits, theirs(ids).logits, 1e-5, "NF4 model vs peft on dequantized weights")


@pytest.mark.parametrize("cls", NF4_CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("double_quant", [False, True])
def test_merge_into_requantized_nf4_reports_the_error(cls, double_quant):
    qmodel = inject_lora(quantize_model(tiny_llama(), cls, double_quant),
                         LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    randomize_lora(qmodel, std=0.05)  # |s B A| ~ 0.01, half the size of the base weights (std 0.02)
    layers = dict(lora_layers(qmodel))
    targets = {n: (l.base_layer.qweight.dequantize(torch.float32) + l.delta_weight()) for n, l in layers.items()}
    ids = tokens()
    with torch.no_grad():
        before = qmodel(ids).logits
        merged, report = merge_and_unload(qmodel, return_report=True)
        after = merged(ids).logits
    assert sorted(report) == sorted(layers)
    for name, rep in report.items():
        new = merged.get_submodule(name)
        assert isinstance(new, cls) and new.qweight.double_quant == double_quant and new.qweight.blocksize == 64
        target = targets[name]
        err = torch.linalg.norm(new.qweight.dequantize(torch.float32) - target)
        assert rep["rel_err"] == pytest.approx((err / torch.linalg.norm(target)).item(), rel=1e-5)
        assert 0.01 < rep["rel_err"] < 0.2, (name, rep)  # 4-bit NF4 on Gaussian-like weights: ~0.1
        assert rep["rel_err_delta"] > 0
    # the merged 4-bit model approximates the LoRA model about as well as 4-bit approximates the dense model
    with torch.no_grad():
        dense_logits = tiny_llama()(ids).logits
        baseline = torch.linalg.norm(quantize_model(tiny_llama(), cls)(ids).logits - dense_logits) / torch.linalg.norm(dense_logits)
    rel = (torch.linalg.norm(after - before) / torch.linalg.norm(before)).item()
    assert 0 < rel < 3 * baseline.item(), (rel, baseline.item())


@pytest.mark.parametrize("cls", NF4_CLASSES, ids=lambda c: c.__name__)
def test_requantizing_a_zero_update_is_lossless(cls):
    """deq(Q) is a fixed point of quantize: merging B = 0 gives back the same codes and a reported error of 0."""
    qmodel = inject_lora(quantize_model(tiny_llama(), cls), LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"))
    old = {n: l.base_layer.qweight for n, l in lora_layers(qmodel)}
    merged, report = merge_and_unload(qmodel, return_report=True)
    for n, qw in old.items():
        assert torch.equal(merged.get_submodule(n).qweight.packed, qw.packed), n
        assert report[n]["rel_err"] == 0.0


@pytest.mark.parametrize("cls", NF4_CLASSES, ids=lambda c: c.__name__)
def test_dequantize_then_merge_gives_a_dense_model(cls, tmp_path):
    from lora import dequantize_linears, save_merged_checkpoint
    from .lora_testlib import transformers

    qmodel = inject_lora(quantize_model(tiny_llama(attention_bias=True), cls), LoraConfig(r=4, lora_alpha=8))
    randomize_lora(qmodel)
    ids = tokens()
    with torch.no_grad():
        expected = qmodel(ids).logits
    merged = merge_and_unload(dequantize_linears(qmodel, torch.float32))
    assert not any(getattr(m, "qweight", None) is not None for m in merged.modules())
    with torch.no_grad():
        assert_close(merged(ids).logits, expected, 1e-5, "dequantized + merged vs NF4 + LoRA")
    save_merged_checkpoint(merged, str(tmp_path))
    reloaded = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        assert_close(reloaded(ids).logits, expected, 1e-5, "reloaded")
