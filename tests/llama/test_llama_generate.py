"""Generation: KV cache vs recomputation, batched left padding vs one prompt at a time, sampling filters against
transformers' logits warpers, EOS stopping, and the command line."""
import subprocess
import sys

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from llama import KVCache, LlamaForCausalLM, ModelArgs, generate
from llama.generate import filter_logits, left_pad, main, sample_next

from .llama_helpers import assert_close, randomize_


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    args = ModelArgs.from_name("tiny", vocab_size=50, num_attention_heads=6, num_key_value_heads=2, hidden_size=48,
                               eos_token_id=3, pad_token_id=0)
    return randomize_(LlamaForCausalLM(args), seed=5, std=0.3).eval()


PROMPTS = [[5, 9, 13, 7, 21, 30, 2], [11], [40, 41, 42, 8]]


def test_cache_equals_no_cache_greedy_and_logits(tiny):
    for p in PROMPTS:
        assert generate(tiny, p, max_new_tokens=20, eos_token_id=[]) == \
            generate(tiny, p, max_new_tokens=20, eos_token_id=[], use_cache=False)
    # logits of incremental decoding equal those of one full forward pass
    ids = torch.tensor([PROMPTS[0] + [1, 2, 3, 4]])
    cache = KVCache.for_model(tiny, 1, 16)
    with torch.no_grad():
        full = tiny(ids).logits
        steps = [tiny(ids[:, :7], cache=cache).logits] + [tiny(ids[:, t:t + 1], cache=cache).logits for t in range(7, 11)]
    assert cache.length == 11
    assert_close(torch.cat(steps, dim=1), full, 1e-5, "incremental logits")


def test_batched_left_padding_equals_one_by_one(tiny):
    alone = [generate(tiny, p, max_new_tokens=15, eos_token_id=[]) for p in PROMPTS]
    assert generate(tiny, PROMPTS, max_new_tokens=15, eos_token_id=[]) == alone
    assert generate(tiny, PROMPTS, max_new_tokens=15, eos_token_id=[], use_cache=False) == alone


def test_left_pad():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=0, device="cpu")
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    with pytest.raises(ValueError, match="at least one token"):
        left_pad([[1], []], 0, "cpu")


def test_stops_at_eos_per_row(tiny):
    free = generate(tiny, PROMPTS, max_new_tokens=12, eos_token_id=[])
    eos = free[0][4]  # make the 5th token of row 0 the stop token
    out = generate(tiny, PROMPTS, max_new_tokens=12, eos_token_id=eos)
    for row, ref in zip(out, free):
        stop = ref.index(eos) + 1 if eos in ref else len(ref)
        assert row == ref[:stop]
    assert out[0][-1] == eos and len(out[0]) <= 5


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, None, None), (1.0, 5, None), (1.3, None, 0.8),
                                                       (0.9, 10, 0.5), (1.0, None, 0.0)])
def test_filters_match_transformers_warpers(temperature, top_k, top_p):
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(1)) * 3
    ours = filter_logits(logits, temperature, top_k, top_p)
    theirs = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        theirs = TopKLogitsWarper(top_k)(None, theirs)
    if top_p is not None:
        theirs = TopPLogitsWarper(top_p)(None, theirs)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    finite = ~torch.isinf(ours)
    assert_close(ours[finite], theirs[finite], 1e-6, "kept logits")


def test_sampling(tiny):
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(2))
    assert torch.equal(sample_next(logits, 1.0, top_k=1), logits.argmax(-1))
    assert torch.equal(sample_next(logits, 2.0, top_p=1e-9), logits.argmax(-1))
    a = generate(tiny, PROMPTS, max_new_tokens=10, temperature=1.0, top_p=0.9,
                 generator=torch.Generator().manual_seed(3), eos_token_id=[])
    b = generate(tiny, PROMPTS, max_new_tokens=10, temperature=1.0, top_p=0.9,
                 generator=torch.Generator().manual_seed(3), eos_token_id=[])
    c = generate(tiny, PROMPTS, max_new_tokens=10, temperature=1.0, generator=torch.Generator().manual_seed(4),
                 eos_token_id=[])
    assert a == b and a != c
    counts = torch.bincount(torch.stack([sample_next(logits[:1], 1.0, generator=torch.Generator().manual_seed(s))
                                         for s in range(400)]).flatten(), minlength=50).float()
    expected = logits[0].softmax(-1) * 400
    assert counts.argmax() == expected.argmax() and (counts - expected).abs().max() < 40


def test_static_decode_equals_dynamic(tiny):
    """Fixed-shape steps against the whole preallocated cache (what a CUDA graph replays) give the tokens of the
    growing cache: one prompt, left-padded batches, sampling with the same generator, EOS stopping."""
    for p in PROMPTS:
        assert generate(tiny, p, max_new_tokens=20, eos_token_id=[], decode="static") == \
            generate(tiny, p, max_new_tokens=20, eos_token_id=[], decode="dynamic")
    assert generate(tiny, PROMPTS, max_new_tokens=15, eos_token_id=[], decode="static") == \
        generate(tiny, PROMPTS, max_new_tokens=15, eos_token_id=[], decode="dynamic")
    kw = dict(max_new_tokens=10, temperature=1.0, top_p=0.9, eos_token_id=[])
    assert generate(tiny, PROMPTS, generator=torch.Generator().manual_seed(3), decode="static", **kw) == \
        generate(tiny, PROMPTS, generator=torch.Generator().manual_seed(3), decode="dynamic", **kw)
    eos = generate(tiny, PROMPTS, max_new_tokens=12, eos_token_id=[])[0][4]
    assert generate(tiny, PROMPTS, max_new_tokens=12, eos_token_id=eos, decode="static") == \
        generate(tiny, PROMPTS, max_new_tokens=12, eos_token_id=eos, decode="dynamic")


def test_static_cache_logits(tiny):
    """Logits of static steps (write position on the device, every key masked past it) equal one full forward;
    a static cache without position ids or a 4-D mask is an error; bad decode modes are errors."""
    ids = torch.tensor([PROMPTS[0] + [1, 2, 3, 4]])
    cache = KVCache.for_model(tiny, 1, 16)
    with torch.no_grad():
        full = tiny(ids).logits
        steps = [tiny(ids[:, :7], cache=cache).logits]
        cache.start_static()
        key_mask = torch.ones(1, 16, dtype=torch.long)
        for t in range(7, 11):
            steps.append(tiny(ids[:, t:t + 1], attention_mask=cache.static_mask(key_mask),
                              position_ids=torch.tensor([[t]]), cache=cache).logits)
            cache.step()
        assert int(cache.write_pos) == 11
        assert_close(torch.cat(steps, dim=1), full, 1e-5, "static-cache logits")
        with pytest.raises(ValueError, match="static KV cache"):
            tiny(ids[:, :1], cache=cache)
    with pytest.raises(ValueError, match="decode must be"):
        generate(tiny, PROMPTS[0], max_new_tokens=2, decode="fast")
    with pytest.raises(ValueError, match="needs the KV cache"):
        generate(tiny, PROMPTS[0], max_new_tokens=2, decode="static", use_cache=False)
    with pytest.raises(ValueError, match="needs a CUDA model"):
        generate(tiny, PROMPTS[0], max_new_tokens=2, decode="graph")


def test_cache_overflow_is_an_error(tiny):
    cache = KVCache.for_model(tiny, 1, 4)
    with pytest.raises(ValueError, match="KV cache overflow"):
        tiny(torch.tensor([[1, 2, 3, 4, 5]]), cache=cache)


def test_cli_prints_the_completion(smollm_dir, capsys):
    assert main(["--model", str(smollm_dir), "--prompt", "What is the capital of France?",
                 "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    assert "Paris" in out
    assert main(["--model", str(smollm_dir), "--prompt", "What is the capital of France?",   # static steps on CPU
                 "--max-new-tokens", "12", "--decode", "static"]) == 0
    assert capsys.readouterr().out == out


def test_cli_batches_repeated_prompts(smollm_dir, capsys):
    """--prompt twice: one left-padded batch, each completion under its prompt, the same greedy text as alone."""
    q1, q2 = "What is the capital of France?", "Name a primary color."
    cpu = ["--device", "cpu"]    # float32: the batch's padded rows round as the lone prompt does
    assert main(["--model", str(smollm_dir), "--prompt", q2, "--max-new-tokens", "8", *cpu]) == 0
    alone = capsys.readouterr().out.strip()
    assert main(["--model", str(smollm_dir), "--prompt", q1, "--prompt", q2, "--max-new-tokens", "8", *cpu]) == 0
    out = capsys.readouterr().out
    first, _, second = out.partition(f"=== 2: {q2}\n")
    assert first.startswith(f"=== 1: {q1}\n") and "Paris" in first
    assert second.strip() == alone


def test_cli_names_an_empty_prompt(smollm_dir, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--model", str(smollm_dir), "--prompt", "Hi", "--prompt", "", "--chat", "no"])
    assert e.value.code == 2
    assert "--prompt number 2 ('') has no tokens" in capsys.readouterr().err


def test_cli_defaults_to_the_embedded_model(smollm_dir):
    r = subprocess.run([sys.executable, "-m", "llama.generate", "--prompt", "Say hello.", "--max-new-tokens", "6"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and "Warning" not in r.stderr
