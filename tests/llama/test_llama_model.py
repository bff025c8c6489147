"""The Llama module against transformers' LlamaForCausalLM on random tiny configs: logits (max abs diff <= 1e-5 in
fp32), loss and gradients, with and without a padding mask."""
import pytest
import torch
import transformers

from llama import LlamaForCausalLM, ModelArgs

from .llama_helpers import assert_close, randomize_

CONFIGS = {
    "mha-untied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
    "gqa-tied": dict(num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True),
    "mqa-odd": dict(vocab_size=97, hidden_size=30, intermediate_size=77, num_attention_heads=3,
                    num_key_value_heads=1, num_hidden_layers=3),
    "head-dim-override-bias": dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   attention_bias=True, mlp_bias=True, rope_theta=500.0, rms_norm_eps=1e-6),
}


def make_pair(name, seed=0):
    args = ModelArgs.from_name("tiny", **{"vocab_size": 131, "hidden_size": 48, "intermediate_size": 100, **CONFIGS[name]})
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**args.to_dict()))
    randomize_(hf, seed)
    ours = LlamaForCausalLM(args)
    missing, unexpected = ours.load_state_dict(hf.state_dict(), strict=False)
    assert not unexpected and missing in ([], ["lm_head.weight"])
    if args.tie_word_embeddings:
        assert ours.lm_head.weight is ours.model.embed_tokens.weight
    return ours.eval(), hf.eval(), args


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(name):
    ours, hf, args = make_pair(name)
    ids = torch.randint(0, args.vocab_size, (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close(ours(ids).logits, hf(ids).logits, 1e-5, f"{name} logits")


@pytest.mark.parametrize("name", CONFIGS)
def test_padded_logits_match_transformers(name):
    """Left and right padding: logits of real tokens equal transformers' given the same positions."""
    ours, hf, args = make_pair(name, seed=2)
    ids = torch.randint(0, args.vocab_size, (3, 13), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0   # left padded
    mask[1, 9:] = 0   # right padded
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        got = ours(ids, attention_mask=mask).logits  # positions derived from the mask
        want = hf(ids, attention_mask=mask, position_ids=pos).logits
    keep = mask.bool()
    assert torch.isfinite(got).all()
    assert_close(got[keep], want[keep], 1e-5, f"{name} padded logits")


@pytest.mark.parametrize("name", ["gqa-tied", "head-dim-override-bias"])
def test_loss_and_gradients_match_transformers(name):
    ours, hf, args = make_pair(name, seed=4)
    ours.train(), hf.train()
    ids = torch.randint(0, args.vocab_size, (2, 11), generator=torch.Generator().manual_seed(5))
    labels = ids.clone()
    labels[0, :4] = -100
    lo, lh = ours(ids, labels=labels).loss, hf(input_ids=ids, labels=labels).loss
    assert_close(lo, lh, 1e-5, "loss")
    lo.backward(), lh.backward()
    theirs = dict(hf.named_parameters())
    for k, p in ours.named_parameters():
        assert_close(p.grad, theirs[k].grad, 1e-5, f"grad of {k}")


def test_gradient_checkpointing_gives_the_same_gradients():
    ours, _, args = make_pair("gqa-tied", seed=6)
    ours.train()
    ids = torch.randint(0, args.vocab_size, (2, 9), generator=torch.Generator().manual_seed(7))
    ours(ids, labels=ids).loss.backward()
    ref = {k: p.grad.clone() for k, p in ours.named_parameters()}
    ours.zero_grad()
    ours.gradient_checkpointing_enable()
    ours(ids, labels=ids).loss.backward()
    for k, p in ours.named_parameters():
        assert_close(p.grad, ref[k], 1e-6, f"checkpointed grad of {k}")


def test_parameter_names_are_the_checkpoint_keys():
    args = ModelArgs.from_name("tiny", num_hidden_layers=1)
    names = set(LlamaForCausalLM(args).state_dict())
    hf = set(transformers.LlamaForCausalLM(transformers.LlamaConfig(**args.to_dict())).state_dict())
    assert names == hf
    assert "model.layers.0.self_attn.q_proj.weight" in names and "lm_head.weight" in names


def test_logits_to_keep_is_the_tail_of_the_full_logits():
    ours, _, args = make_pair("mqa-odd")
    ids = torch.randint(0, args.vocab_size, (2, 8))
    with torch.no_grad():
        full, last = ours(ids).logits, ours(ids, logits_to_keep=1).logits
    assert last.shape == (2, 1, args.vocab_size)
    assert_close(last, full[:, -1:], 1e-6, "last logits")
