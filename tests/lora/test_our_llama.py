"""Our Llama module + our LoRA vs transformers' Llama + peft: same logits and LoRA gradients (fp32, <= 1e-5),
and an adapter trained on our module loads with peft on the transformers model."""
import pytest
import torch

from lora import LoraConfig, adapter_state_dict, inject_lora, lora_layers, merge_and_unload, save_adapter
from .lora_testlib import assert_close, peft, peft_key, randomize_lora, tiny_llama, tokens

checkpoint = pytest.importorskip("llama.checkpoint")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf_tiny")
    tiny_llama(tie_word_embeddings=True).save_pretrained(str(d))
    return d


def same_adapter_same_outputs_and_grads(ours, theirs, tag):
    """Copy our adapter into the peft model, run both on the same tokens with labels, assert equal logits
    and equal gradients of every trainable tensor (1e-5); returns both outputs."""
    peft.set_peft_model_state_dict(theirs, {"base_model.model." + k: v.detach().clone()
                                            for k, v in adapter_state_dict(ours).items()})
    ids = tokens()
    out_ours, out_theirs = ours(ids, labels=ids), theirs(input_ids=ids, labels=ids)
    assert_close(out_ours.logits, out_theirs.logits, 1e-5, f"{tag}logits")
    out_ours.loss.backward()
    out_theirs.loss.backward()
    theirs_params = dict(theirs.named_parameters())
    trainable = {k: p for k, p in ours.named_parameters() if p.requires_grad}
    assert {peft_key(k) for k in trainable} == {k for k, p in theirs_params.items() if p.requires_grad}
    for k, p in trainable.items():
        assert_close(p.grad, theirs_params[peft_key(k)].grad, 1e-5, f"{tag}grad of {k}")
    return out_ours, out_theirs


@pytest.mark.parametrize("kw", [dict(r=4, lora_alpha=8), dict(r=2, lora_alpha=3, target_modules="all-linear",
                                                               use_rslora=True)])
def test_our_llama_with_our_lora_matches_transformers_with_peft(hf_dir, kw):
    ours = checkpoint.load_model(str(hf_dir), dtype=torch.float32)
    inject_lora(ours, LoraConfig(**kw)).eval()
    randomize_lora(ours)
    hf = tiny_llama(tie_word_embeddings=True)
    theirs = peft.get_peft_model(hf, peft.LoraConfig(**kw)).eval()
    assert sorted(n for n, _ in lora_layers(ours)) == sorted(
        n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if type(m).__name__ == "Linear"
        and hasattr(m, "lora_A"))
    out_ours, out_theirs = same_adapter_same_outputs_and_grads(ours, theirs, "")
    assert_close(out_ours.loss, out_theirs.loss, 1e-5, "loss")


def test_adapter_from_our_llama_loads_in_peft_and_merges(hf_dir, tmp_path):
    ours = checkpoint.load_model(str(hf_dir), dtype=torch.float32)
    inject_lora(ours, LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM"))
    randomize_lora(ours)
    save_adapter(ours, str(tmp_path))
    theirs = peft.PeftModel.from_pretrained(tiny_llama(tie_word_embeddings=True), str(tmp_path)).eval()
    ids = tokens()
    with torch.no_grad():
        assert_close(ours(ids).logits, theirs(ids).logits, 1e-5, "logits, peft loading an adapter of our Llama")
        assert_close(merge_and_unload(ours)(ids).logits, theirs.merge_and_unload()(ids).logits, 1e-5,
                     "merged logits")


@pytest.mark.parametrize("with_base_dir", [True, False])
def test_merged_checkpoint_of_our_llama_loads_in_transformers(hf_dir, tmp_path, with_base_dir):
    from lora import save_merged_checkpoint
    from .lora_testlib import transformers

    ours = checkpoint.load_model(str(hf_dir), dtype=torch.float32)
    inject_lora(ours, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    randomize_lora(ours)
    ids = tokens()
    with torch.no_grad():
        expected = ours(ids).logits
    merge_and_unload(ours)
    save_merged_checkpoint(ours, str(tmp_path), base_dir=str(hf_dir) if with_base_dir else None)
    reloaded = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        assert_close(reloaded(ids).logits, expected, 1e-5, "transformers loading our merged Llama")


@pytest.mark.parametrize("double_quant", [False, True])
def test_qlora_our_llama_nf4_matches_transformers_bitsandbytes_peft(hf_dir, double_quant):
    """The QLoRA stack: our Llama loaded with quantize='nf4' + our LoRA vs transformers' Llama with bitsandbytes
    Linear4bit (CPU, blocksize 64) + peft. The NF4 codes are bit-exact, so logits and LoRA grads agree to 1e-5."""
    from .lora_testlib import bnb_quantize

    pytest.importorskip("kernels")
    kw = dict(r=4, lora_alpha=8, target_modules="all-linear")
    ours = checkpoint.load_model(str(hf_dir), quantize="nf4", dtype=torch.float32, double_quant=double_quant)
    assert type(ours.model.layers[0].self_attn.q_proj).__name__ == "NF4Linear"
    inject_lora(ours, LoraConfig(**kw)).eval()
    randomize_lora(ours)
    hf = bnb_quantize(tiny_llama(tie_word_embeddings=True), double_quant=double_quant)
    theirs = peft.get_peft_model(hf, peft.LoraConfig(**kw)).eval()
    same_adapter_same_outputs_and_grads(ours, theirs, "QLoRA ")
    ids = tokens()
    # merging into the 4-bit base: both re-quantize deq(Q) + s B A; the codes agree, so the logits do
    with torch.no_grad():
        merged, report = merge_and_unload(ours, return_report=True)
        theirs_merged = theirs.merge_and_unload()
        assert_close(merged(ids).logits, theirs_merged(ids).logits, 1e-5, "re-quantized merged logits vs peft")
    assert len(report) == 14 and all(0 < r["rel_err"] < 0.2 for r in report.values())


def test_tutorial_flow_reload_fp16_merge_and_save(hf_dir, tmp_path):
    """Train (fp32 adapter) -> save adapter -> reload the base in fp16 -> load adapter -> merge -> save -> transformers
    loads it. Each merged weight is exactly fp16(fp32(W16) + s B A)."""
    from lora import load_adapter, save_merged_checkpoint
    from .lora_testlib import transformers

    trained = checkpoint.load_model(str(hf_dir), dtype=torch.float32)
    inject_lora(trained, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "up_proj"]))
    randomize_lora(trained)
    save_adapter(trained, str(tmp_path / "adapter"))
    model = checkpoint.load_model(str(hf_dir), dtype=torch.float16)
    load_adapter(model, str(tmp_path / "adapter"))
    layers = dict(lora_layers(model))
    expected = {n + ".weight": (l.base_layer.weight.float() + l.scaling * l.lora_B.weight @ l.lora_A.weight).half()
                for n, l in layers.items()}
    save_merged_checkpoint(merge_and_unload(model), str(tmp_path / "merged"), base_dir=str(hf_dir))
    reloaded = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "merged"))
    assert reloaded.dtype == torch.float16 and len(expected) == 6
    sd = reloaded.state_dict()
    for k, w in expected.items():
        assert torch.equal(sd[k], w), k
