"""CUDA-graph decoding on a GPU (skipped on CPU): an NF4-quantized model generates the same tokens with the
decode step captured and replayed as with the growing cache (float32: the same kernels up to SDPA's masked keys)
and as the same static steps run eagerly (bf16: identical kernels, so identical tokens); the graph is reused by a
later call of the same batch size and length bucket, and a changed model captures anew."""
import pytest
import torch

from llama import LlamaForCausalLM, ModelArgs, generate, load_model, release_decode_graph, save_model

from .llama_helpers import randomize_

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")

PROMPTS = [[5, 9, 13, 7, 21, 30, 2], [11], [40, 41, 42, 8]]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_gen")
    args = ModelArgs.from_name("tiny", vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, eos_token_id=3, pad_token_id=0)
    save_model(randomize_(LlamaForCausalLM(args), seed=5, std=0.3), d)
    return d


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_decode(ckpt, dtype):
    model = load_model(ckpt, quantize="nf4", device="cuda", dtype=dtype).eval()
    ref_mode = "dynamic" if dtype == torch.float32 else "static"
    for p in (PROMPTS[0], PROMPTS):
        ref = generate(model, p, max_new_tokens=24, eos_token_id=[], decode=ref_mode)
        assert generate(model, p, max_new_tokens=24, eos_token_id=[], decode="graph") == ref, ref_mode
        held = model._decode_graph
        # same batch size and length bucket: the held graph is replayed, not captured again
        again = generate(model, p, max_new_tokens=20, eos_token_id=[], decode="graph")
        assert model._decode_graph is held
        assert again == (ref[:20] if isinstance(ref[0], int) else [r[:20] for r in ref])
    eos = generate(model, PROMPTS, max_new_tokens=12, eos_token_id=[], decode=ref_mode)[0][4]
    assert generate(model, PROMPTS, max_new_tokens=12, eos_token_id=eos, decode="graph") == \
        generate(model, PROMPTS, max_new_tokens=12, eos_token_id=eos, decode=ref_mode)
    held = model._decode_graph
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach() * -1.0)  # a new weight tensor
    flipped = generate(model, PROMPTS, max_new_tokens=12, eos_token_id=[], decode="graph")
    assert model._decode_graph is not held
    assert flipped == generate(model, PROMPTS, max_new_tokens=12, eos_token_id=[], decode=ref_mode)
    release_decode_graph(model)
    assert model._decode_graph is None
