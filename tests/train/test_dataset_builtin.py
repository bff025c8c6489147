"""The embedded stdlib-docstring instruction dataset."""
import json

from train.dataset_builtin import builtin_dataset, collect_pairs


def test_size_split_determinism_and_format():
    train, test = builtin_dataset()
    assert len(train) + len(test) >= 1000 and len(train) >= 1000
    assert 0.02 < len(test) / (len(train) + len(test)) < 0.1
    assert not {r["name"] for r in train} & {r["name"] for r in test}
    train2, test2 = builtin_dataset()
    assert json.dumps(train) == json.dumps(train2) and json.dumps(test) == json.dumps(test2)
    r = next(r for r in train + test if r["name"] == "json.dumps")
    assert r["text"].startswith("<|im_start|>user\n") and "`json.dumps`" in r["text"]
    assert r["text"].endswith("<|im_end|>\n") and "<|im_start|>assistant\nSerialize" in r["text"]
    assert r["messages"][1]["role"] == "assistant"


def test_answers_are_docstring_prose():
    pairs = collect_pairs()
    assert all(25 <= len(p["answer"]) <= 610 for p in pairs)
    import re
    sig = re.compile(r"^[\w.]+\(.*?\)\s*(-->|->| - )")
    assert not [p["answer"] for p in pairs if sig.match(p["answer"])]  # no C signatures
    assert len({p["answer"] for p in pairs}) == len(pairs)


def test_llama2_rendering_like_guanaco():
    train, _ = builtin_dataset("llama2")
    t = train[0]["text"]
    assert t.startswith("<s>[INST] ") and " [/INST] " in t and t.endswith(" </s>")
