"""Data: load records from files / save_to_disk dirs / the hub, turn them into token ids, pad, pack.

    records = load_records("data.jsonl")                       # list[dict]
    texts   = records_to_texts(records, "text", chat_format)     # list[str]
    ds, stats = tokenize_texts(texts, tok, max_seq_length=512)   # TokenizedDataset, stats["truncated"]
    batch   = collate(ds[0:4], pad_id=tok.pad_id)                # input_ids/attention_mask/labels (B, T)

Tokenizer interface (llama/ provides it): `encode(text, add_bos=..., add_eos=...) -> list[int]`, `bos_id`,
`eos_id`, `pad_id` (pad = eos, as the tutorial sets). Each example is BOS + tokens + EOS, truncated to
max_seq_length (the count of cut examples is reported); labels equal input_ids except -100 on padding and,
with train_on_responses_only, on everything outside the assistant responses. Padding is on the right.
Packing concatenates examples (each already ends in EOS, the separator) and cuts max_seq_length blocks.
"""
from __future__ import annotations

import csv
import glob
import json
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

IGNORE_INDEX = -100
DATA_EXTENSIONS = (".jsonl", ".json", ".parquet", ".csv", ".arrow")


class DataError(ValueError):
    """The dataset is unusable; the message names the file, line or record and what was expected."""


# --------------------------------------------------------------------------------------------------------
# loading
def _read_jsonl(path: str) -> list[dict]:
    out = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: line does not parse as JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object per line, got {type(rec).__name__}")
            out.append(rec)
    return out


def _read_json(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        raw = fh.read()
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        if raw.lstrip().startswith("{") and "\n" in raw.strip():
            return _read_jsonl(path)  # JSON lines saved as .json
        raise DataError(f"{path}:{e.lineno}: does not parse as JSON ({e.msg} at column {e.colno})") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if "data" in data and isinstance(data["data"], list):
            data = data["data"]
        elif len(lists) == 1:
            data = lists[0]
        elif data and all(isinstance(v, list) for v in data.values()):  # columnar {"text": [...], ...}
            keys = list(data)
            data = [dict(zip(keys, row)) for row in zip(*data.values())]
        else:
            data = [data]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{path}: expected a list of objects (records)")
    return data


def _read_csv(path: str) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as fh:
        return [dict(r) for r in csv.DictReader(fh)]


def _read_parquet(path: str) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    return pq.read_table(path).to_pylist()


def _read_arrow(path: str) -> list[dict]:
    """An Arrow file as `datasets` writes it (IPC stream), or the IPC file format."""
    try:
        import pyarrow as pa
    except ImportError:
        raise DataError(f"{path}: reading Arrow files needs pyarrow (pip install pyarrow)") from None
    with open(path, "rb") as fh:
        try:
            table = pa.ipc.open_stream(fh).read_all()
        except pa.ArrowInvalid:
            fh.seek(0)
            table = pa.ipc.open_file(fh).read_all()
    return table.to_pylist()


_READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet,
            ".arrow": _read_arrow}


def _read_file(path: str) -> list[dict]:
    ext = os.path.splitext(path)[1].lower()
    if ext not in _READERS:
        raise DataError(f"{path}: unsupported file type {ext!r}; expected one of {', '.join(DATA_EXTENSIONS)}")
    return _READERS[ext](path)


def _save_to_disk_files(path: str, split: str) -> Optional[list[str]]:
    """Arrow files of a `datasets` save_to_disk directory (Dataset or DatasetDict), or None if it is not one."""
    if os.path.isfile(os.path.join(path, "dataset_dict.json")):
        with open(os.path.join(path, "dataset_dict.json")) as fh:
            splits = json.load(fh).get("splits", [])
        if split not in splits:
            raise DataError(f"{path}: saved DatasetDict has splits {splits}, not {split!r}")
        path = os.path.join(path, split)
    state = os.path.join(path, "state.json")
    if not os.path.isfile(state):
        return None
    with open(state) as fh:
        files = [f["filename"] for f in json.load(fh).get("_data_files", [])]
    return [os.path.join(path, f) for f in files] or sorted(glob.glob(os.path.join(path, "*.arrow")))


def _directory_files(path: str, split: str) -> list[str]:
    files = sorted(f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                   if os.path.isfile(f) and f.lower().endswith(DATA_EXTENSIONS)
                   and not os.path.basename(f).startswith("."))
    # hub layouts name splits in the file name (data/train-00000-of-00001.parquet); keep the asked split
    named = [f for f in files if re.search(r"(^|[/_.-])" + re.escape(split) + r"([/_.-]|$)", os.path.relpath(f, path))]
    has_splits = any(re.search(r"(^|[/_.-])(train|test|validation|eval)([/_.-]|$)", os.path.relpath(f, path))
                     for f in files)
    return named if (named or has_splits) else files


def load_records(source: str, split: str = "train") -> list[dict]:
    """Records from a file, a directory of files, a save_to_disk directory, or a hub dataset id.

    Raises DataError for unreadable input and for an empty result.
    """
    if os.path.isfile(source):
        records = _read_file(source)
    elif os.path.isdir(source):
        files = _save_to_disk_files(source, split) or _directory_files(source, split)
        if not files:
            raise DataError(f"{source}: directory holds no data files ({', '.join(DATA_EXTENSIONS)})")
        records = [r for f in files for r in _read_file(f)]
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", source) and not source.startswith((".", "/")):
        records = load_records(_download_hub_dataset(source), split)
    else:
        raise DataError(f"dataset {source!r}: no such file or directory, and not a hub id (owner/name)")
    if not records:
        raise DataError(f"dataset {source!r} (split {split!r}) is empty: no records to train on")
    return records


def _download_hub_dataset(repo_id: str) -> str:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise DataError(f"dataset {repo_id!r} looks like a hub id; downloading it needs huggingface_hub") from None
    try:
        return snapshot_download(repo_id, repo_type="dataset",
                                 allow_patterns=["*.parquet", "*.jsonl", "*.json", "*.csv", "*.arrow"])
    except Exception as e:  # no network, no such repo, gated
        raise DataError(f"dataset {repo_id!r}: not a local path and the hub download failed "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


# --------------------------------------------------------------------------------------------------------
# records -> text
def chatml(messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    """SmolLM2's chat_template: <|im_start|>role\\ncontent<|im_end|>\\n per message."""
    s = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return s + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def llama2_chat(messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    """guanaco-llama2-1k's format: <s>[INST] user [/INST] assistant </s> (system folded into the first turn)."""
    out, system = "", None
    for m in messages:
        if m["role"] == "system":
            system = m["content"]
        elif m["role"] == "user":
            content = m["content"] if system is None else f"<<SYS>>\n{system}\n<</SYS>>\n\n{m['content']}"
            system = None
            out += f"<s>[INST] {content} [/INST]"
        else:
            out += f" {m['content']} </s>"
    return out


# response spans: (text that opens a response, text that closes it) per chat format
RESPONSE_MARKERS = {"chatml": ("<|im_start|>assistant\n", "<|im_end|>"), "llama2": ("[/INST]", "</s>")}


def records_to_texts(records: Sequence[dict], text_field: str = "text",
                     chat_format: Callable[[Sequence[dict]], str] = chatml, source: str = "dataset") -> list[str]:
    """The text of each record: `text_field`, else chat `messages` rendered with chat_format."""
    texts = []
    for i, rec in enumerate(records):
        if text_field in rec and rec[text_field] is not None:
            t = rec[text_field]
            if not isinstance(t, str):
                raise DataError(f"{source}: record {i}: field {text_field!r} is {type(t).__name__}, expected a string")
            texts.append(t)
        elif isinstance(rec.get("messages"), list):
            msgs = rec["messages"]
            for j, m in enumerate(msgs):
                if not isinstance(m, dict) or "role" not in m or "content" not in m:
                    raise DataError(f"{source}: record {i}: messages[{j}] needs 'role' and 'content'")
            texts.append(chat_format(msgs))
        else:
            raise DataError(f"{source}: record {i} has no {text_field!r} field (nor chat 'messages'); "
                            f"its fields are {sorted(rec)}; set --dataset_text_field")
    return texts


# --------------------------------------------------------------------------------------------------------
# text -> tokens
@dataclass
class TokenizedDataset(torch.utils.data.Dataset):
    """Examples {"input_ids": list[int], "labels": list[int]}; `lengths` for group_by_length."""

    examples: list[dict]
    stats: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]

    @property
    def lengths(self) -> list[int]:
        return [len(e["input_ids"]) for e in self.examples]

    @property
    def num_tokens(self) -> int:
        return sum(self.lengths)


def _segments(text: str, markers: tuple[str, str]) -> list[tuple[str, bool]]:
    """Split text into (piece, is_response) runs: a response starts after `open` and ends after `close`."""
    open_, close = markers
    out, pos = [], 0
    while True:
        i = text.find(open_, pos)
        if i < 0:
            break
        start = i + len(open_)
        j = text.find(close, start)
        end = len(text) if j < 0 else j + len(close)
        out.append((text[pos:start], False))
        out.append((text[start:end], True))
        pos = end
    out.append((text[pos:], False))
    return [(s, r) for s, r in out if s]


def tokenize_texts(texts: Sequence[str], tokenizer, max_seq_length: Optional[int] = None,
                   train_on_responses_only: bool = False, response_markers: tuple[str, str] = RESPONSE_MARKERS["chatml"],
                   add_bos: bool = True, add_eos: bool = True) -> TokenizedDataset:
    """BOS + encode(text) + EOS per text, truncated to max_seq_length; stats["truncated"] counts the cut ones.

    train_on_responses_only: the text is encoded piece by piece (prompt / response runs found with
    response_markers) and the labels of prompt pieces, BOS and EOS-after-prompt are -100.
    """
    examples, truncated, dropped = [], 0, 0
    for text in texts:
        if train_on_responses_only:
            ids = [tokenizer.bos_id] if add_bos else []
            labels = [IGNORE_INDEX] * len(ids)
            any_response = False
            for piece, is_resp in _segments(text, response_markers):
                t = tokenizer.encode(piece, add_bos=False, add_eos=False)
                ids += t
                labels += t if is_resp else [IGNORE_INDEX] * len(t)
                any_response |= is_resp and bool(t)
            if add_eos:
                ids.append(tokenizer.eos_id)
                labels.append(tokenizer.eos_id if any_response else IGNORE_INDEX)
        else:
            ids = tokenizer.encode(text, add_bos=add_bos, add_eos=add_eos)
            labels = list(ids)
        if max_seq_length is not None and len(ids) > max_seq_length:
            ids, labels = ids[:max_seq_length], labels[:max_seq_length]
            truncated += 1
        if all(x == IGNORE_INDEX for x in labels[1:]):
            dropped += 1  # nothing to learn from (e.g. truncation removed the whole response)
            continue
        examples.append({"input_ids": ids, "labels": labels})
    if not examples:
        raise DataError(f"no usable examples after tokenization ({len(texts)} texts, {dropped} without any "
                        f"trainable token)")
    return TokenizedDataset(examples, {"examples": len(examples), "truncated": truncated, "dropped": dropped,
                                       "max_seq_length": max_seq_length})


def pack(dataset: TokenizedDataset, max_seq_length: int) -> TokenizedDataset:
    """Concatenate all examples (each ends in EOS, the separator) and cut blocks of max_seq_length tokens.

    The last block keeps the remainder (shorter; padded at collation).
    """
    ids = [t for e in dataset.examples for t in e["input_ids"]]
    labels = [t for e in dataset.examples for t in e["labels"]]
    blocks = [{"input_ids": ids[i: i + max_seq_length], "labels": labels[i: i + max_seq_length]}
              for i in range(0, len(ids), max_seq_length)]
    blocks = [b for b in blocks if any(x != IGNORE_INDEX for x in b["labels"][1:])]
    stats = dict(dataset.stats, packed_blocks=len(blocks), packed_from=len(dataset.examples))
    return TokenizedDataset(blocks, stats)


def collate(examples: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids with pad_id, attention_mask 0, labels -100.  (B, T) each."""
    T = max(len(e["input_ids"]) for e in examples)
    B = len(examples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[b, :n] = torch.tensor(e["input_ids"], dtype=torch.long)
        labels[b, :n] = torch.tensor(e["labels"], dtype=torch.long)
        mask[b, :n] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def split_train_eval(records: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    """Deterministic held-out split: a seeded permutation, the last ceil(n*fraction) records for eval."""
    if eval_fraction <= 0 or len(records) < 2:
        return list(records), []
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(records), generator=g).tolist()
    n_eval = max(1, int(round(len(records) * eval_fraction)))
    return [records[i] for i in perm[:-n_eval]], [records[i] for i in perm[-n_eval:]]
