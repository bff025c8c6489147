"""Shared helpers for the lora tests: a tiny random transformers Llama, and our LoRA vs peft on twin copies."""
import copy

import pytest
import torch

from lora import LoraConfig, adapter_state_dict, inject_lora, lora_layers

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB = 96


def tiny_llama(seed: int = 0, **overrides):
    """A 2-layer fp32 LlamaForCausalLM (hidden 32, 4 heads, 2 KV heads), random weights, eval mode."""
    kw = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=56, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    kw.update(overrides)
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**kw)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # transformers initializes biases to zero; make them matter
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(std=0.1)
    return model


def randomize_lora(model, seed: int = 1, std: float = 0.1):
    """Give every LoRA weight random values (B included, so the update is not zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for p in list(layer.lora_A.parameters()) + list(layer.lora_B.parameters()):
                p.copy_(torch.randn(p.shape, generator=g) * std)


def peft_key(our_key: str) -> str:
    """Our in-memory parameter name -> peft's in-memory name (prefix, adapter name 'default')."""
    for part in (".lora_A.", ".lora_B."):
        our_key = our_key.replace(part, part + "default.")
    return "base_model.model." + our_key


def make_pair(model_kwargs=None, seed: int = 0, **lora_kwargs):
    """(ours, theirs): the same tiny Llama, our inject_lora vs peft.get_peft_model, identical LoRA weights."""
    base = tiny_llama(seed, **(model_kwargs or {}))
    twin = copy.deepcopy(base)
    ours = inject_lora(base, LoraConfig(**lora_kwargs)).eval()
    randomize_lora(ours)
    theirs = peft.get_peft_model(twin, peft.LoraConfig(**lora_kwargs)).eval()
    sd = {"base_model.model." + k: v.detach().clone() for k, v in adapter_state_dict(ours).items()}
    res = peft.set_peft_model_state_dict(theirs, sd)
    assert not res.unexpected_keys, res.unexpected_keys
    return ours, theirs


def tokens(batch: int = 2, seq: int = 7, seed: int = 3):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def assert_close(actual, expected, atol, what=""):
    """Fails on a single element off by more than atol; the message names the worst element."""
    actual, expected = actual.detach().float(), expected.detach().float()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual - expected).abs()
    worst = diff.max().item() if diff.numel() else 0.0
    if not worst <= atol:
        idx = tuple(int(i) for i in torch.nonzero(diff == diff.max())[0])
        raise AssertionError(f"{what}: max |diff| {worst:.3e} > {atol:.1e} at {idx}: "
                             f"{actual[idx].item()} vs {expected[idx].item()}")


def bnb_quantize(model, compute_dtype=torch.float32, double_quant=False):
    """Every linear but lm_head -> bitsandbytes Linear4bit NF4 (blocksize 64), quantized on the CPU."""
    bnb = pytest.importorskip("bitsandbytes")
    for name, m in list(model.named_modules()):
        if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head"):
            q = bnb.nn.Linear4bit(m.in_features, m.out_features, bias=m.bias is not None, quant_type="nf4",
                                  compute_dtype=compute_dtype)
            q.weight = bnb.nn.Params4bit(m.weight.detach().clone(), requires_grad=False, quant_type="nf4",
                                         blocksize=64, compress_statistics=double_quant)
            if m.bias is not None:
                q.bias = torch.nn.Parameter(m.bias.detach().clone())
            q = q.to("cpu")
            if not q.weight.bnb_quantized:
                q.weight = q.weight._quantize("cpu")
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, q)
    model.is_loaded_in_4bit = True  # what from_pretrained(quantization_config=...) sets; peft then uses lora.bnb layers
    return model
