"""Our LoRA on a transformers Llama vs peft's on a twin copy: same outputs and LoRA gradients (fp32, <= 1e-5)."""
import io
from contextlib import redirect_stdout

import pytest
import torch

from lora import trainable_parameters_report
from .lora_testlib import assert_close, make_pair, peft_key, tokens

CASES = {
    "default q,v": dict(r=4, lora_alpha=8),
    "all-linear rslora": dict(r=8, lora_alpha=16, use_rslora=True, target_modules="all-linear"),
    "regex": dict(r=2, lora_alpha=5, target_modules=r".*\.layers\.1\.mlp\.(gate|down)_proj"),
    "list + bias lora_only": dict(r=3, lora_alpha=6, target_modules=["k_proj", "o_proj", "up_proj"], bias="lora_only"),
    "lora_bias + bias all": dict(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_bias=True, bias="all"),
    "all-linear minus exclude": dict(r=2, lora_alpha=2, target_modules="all-linear", exclude_modules=["down_proj"]),
    "rank/alpha pattern": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                               rank_pattern={"layers.0.self_attn.v_proj": 2}, alpha_pattern={"q_proj": 3}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_outputs_and_gradients_match_peft(name):
    kw = CASES[name]
    model_kw = dict(attention_bias=True) if kw.get("bias", "none") != "none" or kw.get("lora_bias") else {}
    ours, theirs = make_pair(model_kw, **kw)
    ids = tokens()
    out_ours = ours(input_ids=ids, labels=ids)
    out_theirs = theirs(input_ids=ids, labels=ids)
    assert_close(out_ours.logits, out_theirs.logits, 1e-5, f"{name}: logits")
    out_ours.loss.backward()
    out_theirs.loss.backward()
    theirs_params = dict(theirs.named_parameters())
    ours_trainable = {k: p for k, p in ours.named_parameters() if p.requires_grad}
    theirs_trainable = {k for k, p in theirs_params.items() if p.requires_grad}
    assert {peft_key(k) for k in ours_trainable} == theirs_trainable, name
    assert any(".lora_B." in k for k in ours_trainable)
    for k, p in ours_trainable.items():
        assert_close(p.grad, theirs_params[peft_key(k)].grad, 1e-5, f"{name}: grad of {k}")


@pytest.mark.parametrize("name", ["default q,v", "all-linear rslora", "list + bias lora_only"])
def test_trainable_parameters_report_matches_peft(name):
    kw = CASES[name]
    ours, theirs = make_pair(dict(attention_bias=True), **kw)
    buf = io.StringIO()
    with redirect_stdout(buf):
        theirs.print_trainable_parameters()
    assert trainable_parameters_report(ours) == buf.getvalue().strip()


def test_default_targets_are_q_and_v():
    ours, theirs = make_pair(r=2, lora_alpha=4)
    wrapped = sorted(n for n, m in ours.named_modules() if type(m).__name__ == "LoRALinear")
    assert wrapped == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    assert sorted(ours.lora_config.target_modules) == ["q_proj", "v_proj"]
    assert set(theirs.peft_config["default"].target_modules) == {"q_proj", "v_proj"}


def test_train_mode_dropout_matches_peft_under_the_same_seed():
    """peft and we draw one dropout mask per LoRA layer on its input, in forward order: same seed, same output."""
    ours, theirs = make_pair(r=4, lora_alpha=8, lora_dropout=0.3, target_modules=["q_proj", "v_proj", "up_proj"])
    ours.train()
    theirs.train()
    ids = tokens()
    torch.manual_seed(123)
    a = ours(input_ids=ids).logits
    torch.manual_seed(123)
    b = theirs(input_ids=ids).logits
    assert_close(a, b, 1e-5, "train-mode logits with lora_dropout=0.3")
    ours.eval()
    assert (ours(input_ids=ids).logits - a).abs().max() > 1e-4  # dropout did act in train mode
