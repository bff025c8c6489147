"""Data loading, tokenization, masking, packing, collation, and their errors."""
import json

import pytest

from train.data import (IGNORE_INDEX, DataError, chatml, collate, load_records, pack, records_to_texts,
                        split_train_eval, tokenize_texts)

RECS = [{"text": "hello world", "n": 1}, {"text": "second", "n": 2}, {"text": "third one", "n": 3}]


def _write_all_formats(d):
    (d / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECS))
    (d / "b.json").write_text(json.dumps(RECS))
    (d / "c.csv").write_text("text,n\n" + "".join(f"{r['text']},{r['n']}\n" for r in RECS))
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(RECS), d / "d.parquet")


def test_each_format_and_a_directory(tmp_path):
    _write_all_formats(tmp_path)
    for name in ("a.jsonl", "b.json", "c.csv", "d.parquet"):
        recs = load_records(str(tmp_path / name))
        assert [r["text"] for r in recs] == [r["text"] for r in RECS], name
    assert len(load_records(str(tmp_path))) == 12


def test_save_to_disk_directory_read_with_pyarrow(tmp_path):
    """The layout `datasets.Dataset.save_to_disk` writes (arrow IPC stream + state.json), and a DatasetDict."""
    import pyarrow as pa
    table = pa.Table.from_pylist(RECS)
    for split in ("train", "test"):
        d = tmp_path / "dd" / split
        d.mkdir(parents=True)
        with pa.OSFile(str(d / "data-00000-of-00001.arrow"), "wb") as sink:
            with pa.ipc.new_stream(sink, table.schema) as w:
                w.write_table(table)
        (d / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
        (d / "dataset_info.json").write_text("{}")
    (tmp_path / "dd" / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    assert [r["text"] for r in load_records(str(tmp_path / "dd" / "train"))] == ["hello world", "second", "third one"]
    assert len(load_records(str(tmp_path / "dd"), split="test")) == 3
    with pytest.raises(DataError, match="splits"):
        load_records(str(tmp_path / "dd"), split="validation")


def test_hub_layout_directory_keeps_the_split(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    (tmp_path / "data").mkdir()
    pq.write_table(pa.Table.from_pylist(RECS), tmp_path / "data" / "train-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(RECS[:1]), tmp_path / "data" / "test-00000-of-00001.parquet")
    assert len(load_records(str(tmp_path))) == 3
    assert len(load_records(str(tmp_path), split="test")) == 1


def test_errors_name_the_problem(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "broken"\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: line does not parse as JSON"):
        load_records(str(bad))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="is empty"):
        load_records(str(empty))
    with pytest.raises(DataError, match=r"record 1 has no 'text' field .* \['content'\]"):
        records_to_texts([{"text": "a"}, {"content": "b"}])
    with pytest.raises(DataError, match="no such file"):
        load_records(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="unsupported file type"):
        (tmp_path / "x.txt").write_text("hi")
        load_records(str(tmp_path / "x.txt"))


def test_messages_rendered_in_chatml():
    recs = [{"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}]
    assert records_to_texts(recs) == ["<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"]


def test_tokenize_bos_eos_truncation_and_padding(byte_tok):
    ds = tokenize_texts(["abc", "a" * 50, "xy"], byte_tok, max_seq_length=10)
    assert ds.stats["truncated"] == 1
    assert ds[0]["input_ids"] == [1, 100, 101, 102, 2] == ds[0]["labels"]
    assert len(ds[1]["input_ids"]) == 10
    b = collate([ds[0], ds[2]], pad_id=byte_tok.pad_id)
    assert b["input_ids"].shape == (2, 5)
    assert b["input_ids"][1].tolist() == [1, 123, 124, 2, 2]          # right padding with pad = eos
    assert b["labels"][1].tolist() == [1, 123, 124, 2, IGNORE_INDEX]  # the real EOS is learned, padding is not
    assert b["attention_mask"][1].tolist() == [1, 1, 1, 1, 0]


def test_train_on_responses_only_masks_prompts(byte_tok):
    text = chatml([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}])
    ds = tokenize_texts([text], byte_tok, train_on_responses_only=True)
    ids, labels = ds[0]["input_ids"], ds[0]["labels"]
    assert ids == byte_tok.encode(text, add_bos=True, add_eos=True)   # same ids as whole-text encoding
    learned = byte_tok.decode([t for t in labels if t != IGNORE_INDEX])
    assert learned == "A<|im_end|>"
    assert labels[-1] == byte_tok.eos_id


def test_packing_with_eos_separators(byte_tok):
    ds = tokenize_texts(["ab", "cde", "f"], byte_tok)
    packed = pack(ds, max_seq_length=4)
    flat = [t for e in packed.examples for t in e["input_ids"]]
    assert flat == [1, 100, 101, 2, 1, 102, 103, 104, 2, 1, 105, 2]
    assert [len(e["input_ids"]) for e in packed.examples] == [4, 4, 4]


def test_split_is_deterministic_and_disjoint():
    recs = [{"text": str(i)} for i in range(100)]
    a, b = split_train_eval(recs, 0.1, seed=3)
    a2, b2 = split_train_eval(recs, 0.1, seed=3)
    assert a == a2 and b == b2 and len(b) == 10
    assert not {r["text"] for r in a} & {r["text"] for r in b}


def test_hub_id_goes_through_huggingface_hub(tmp_path, monkeypatch):
    """No network in tests: snapshot_download is replaced by a local snapshot, then by a failure."""
    import huggingface_hub
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "data").mkdir()
    pq.write_table(pa.Table.from_pylist(RECS), tmp_path / "data" / "train-00000-of-00001.parquet")
    seen = {}

    def fake_download(repo_id, repo_type=None, allow_patterns=None):
        seen.update(repo_id=repo_id, repo_type=repo_type)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    assert len(load_records("mlabonne/guanaco-llama2-1k")) == 3
    assert seen == {"repo_id": "mlabonne/guanaco-llama2-1k", "repo_type": "dataset"}

    def offline(*a, **k):
        raise OSError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(DataError, match="not a local path and the hub download failed"):
        load_records("owner/some-dataset")
