"""The embedded instruction dataset: Python standard-library docstrings as question -> answer pairs.

No network, no files: the text ships with Python. For each public function, class and method of a fixed
list of standard-library modules that has a docstring, one example:

    user:      What does `json.dumps` do?             (one of a few phrasings, chosen by a hash of the name)
    assistant: Serialize ``obj`` to a JSON formatted ``str``.   (the docstring's first paragraph, <= 600 chars)

rendered in the model's chat format the way guanaco-llama2-1k renders Llama 2 conversations in a single
`text` field (ChatML for SmolLM2: <|im_start|>user\\n...<|im_end|>\\n<|im_start|>assistant\\n...<|im_end|>\\n).
Deterministic for a given Python version: modules and names are sorted, phrasings and the held-out split
(about 5%) come from crc32 of the qualified name, so an example never changes sides.

    train, test = builtin_dataset()          # lists of {"text", "messages", "name"}
"""
from __future__ import annotations

import importlib
import inspect
import re
import warnings
import zlib
from typing import Callable, Sequence

from .data import chatml, llama2_chat

MODULES = (
    "abc", "argparse", "array", "ast", "asyncio", "base64", "bisect", "binascii", "bz2", "calendar", "cmath",
    "codecs", "collections", "colorsys", "concurrent.futures", "configparser", "contextlib", "copy", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "dis", "email", "enum", "filecmp", "fnmatch", "fractions",
    "ftplib", "functools", "gc", "getopt", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "html",
    "html.parser", "http.client", "http.server", "imaplib", "inspect", "io", "ipaddress", "itertools", "json",
    "keyword", "linecache", "locale", "logging", "lzma", "mailbox", "math", "mimetypes", "numbers", "operator",
    "os", "os.path", "pathlib", "pickle", "pickletools", "platform", "plistlib", "poplib", "pprint", "queue",
    "quopri", "random", "re", "reprlib", "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "signal",
    "smtplib", "socket", "socketserver", "sqlite3", "ssl", "stat", "statistics", "string", "struct",
    "subprocess", "sys", "tarfile", "tempfile", "textwrap", "threading", "time", "timeit", "token", "tokenize",
    "traceback", "types", "typing", "unicodedata", "unittest", "urllib.parse", "urllib.request", "uuid",
    "warnings", "wave", "weakref", "webbrowser", "xml.dom.minidom", "xml.etree.ElementTree", "zipfile", "zlib",
)

QUESTIONS = (
    "What does `{name}` do?",
    "Explain `{name}` from Python's `{module}` module.",
    "In Python, what is `{name}` for?",
    "Briefly describe `{name}`.",
)
MAX_ANSWER_CHARS = 600
EVAL_MODULUS = 20  # crc32(name) % 20 == 0 -> held out (~5%)

_SIGNATURE = re.compile(r"^[\w.]+\(.*\)(\s*-{1,2}>\s*.*)?$")      # "f(x) -> int", "deque([it]) --> deque object"
_SIGNATURE_PREFIX = re.compile(r"^[\w.]+\(.*?\)\s+-{1,2}>?\s+")  # "partial(func, ...) - new function ..."


def _first_paragraph(doc: str) -> str:
    """The first paragraph of a docstring, signature lines of C functions dropped, whitespace normalised."""
    doc = inspect.cleandoc(doc)
    paras = [p for p in re.split(r"\n\s*\n", doc) if p.strip()]
    while paras and all(_SIGNATURE.match(line.strip()) or line.strip().startswith("--")
                        for line in paras[0].splitlines()):
        paras = paras[1:]
    if not paras:
        return ""
    lines = [ln for ln in paras[0].splitlines() if not _SIGNATURE.match(ln.strip())]
    text = _SIGNATURE_PREFIX.sub("", " ".join(ln.strip() for ln in lines).strip())
    text = text[:1].upper() + text[1:]
    if len(text) > MAX_ANSWER_CHARS:  # cut at the last sentence end before the limit
        cut = text.rfind(". ", 0, MAX_ANSWER_CHARS)
        text = text[: cut + 1] if cut > 80 else text[:MAX_ANSWER_CHARS].rsplit(" ", 1)[0] + " ..."
    return text


def _answerable(text: str) -> bool:
    return len(text) >= 25 and text[0].isalpha() and not text.lower().startswith(("todo", "xxx", "deprecated"))


def _public_members(mod) -> list[tuple[str, object]]:
    names = getattr(mod, "__all__", None) or [n for n in dir(mod) if not n.startswith("_")]
    out = []
    for n in sorted(set(names)):
        try:
            obj = getattr(mod, n)
        except Exception:  # noqa: BLE001 - lazy attributes that fail to import
            continue
        if inspect.isfunction(obj) or inspect.isbuiltin(obj) or inspect.isclass(obj):
            owner = getattr(obj, "__module__", mod.__name__) or mod.__name__
            # keep names defined in this module (or its C accelerator: _json, _heapq, ...)
            if owner.lstrip("_").split(".")[0] == mod.__name__.split(".")[0] or inspect.isbuiltin(obj):
                out.append((n, obj))
    return out


def collect_pairs() -> list[dict]:
    """All (name, question, answer) triples, sorted by name, duplicates (same answer text) dropped."""
    pairs, seen_names, seen_answers = [], set(), set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for modname in MODULES:
            try:
                mod = importlib.import_module(modname)
            except Exception:  # noqa: BLE001 - module absent on this platform/build
                continue
            for n, obj in _public_members(mod):
                items = [(f"{modname}.{n}", obj)]
                if inspect.isclass(obj):
                    for mname, meth in sorted(vars(obj).items()):
                        if not mname.startswith("_") and (inspect.isfunction(meth) or inspect.ismethoddescriptor(meth)):
                            items.append((f"{modname}.{n}.{mname}", meth))
                for qual, o in items:
                    doc = getattr(o, "__doc__", None)
                    if not isinstance(doc, str) or qual in seen_names:
                        continue
                    ans = _first_paragraph(doc)
                    if not _answerable(ans) or ans in seen_answers:
                        continue
                    seen_names.add(qual)
                    seen_answers.add(ans)
                    h = zlib.crc32(qual.encode())
                    q = QUESTIONS[h % len(QUESTIONS)].format(name=qual, module=modname)
                    pairs.append({"name": qual, "question": q, "answer": ans, "held_out": h % EVAL_MODULUS == 0})
    pairs.sort(key=lambda p: p["name"])
    return pairs


CHAT_FORMATS: dict[str, Callable[[Sequence[dict]], str]] = {"chatml": chatml, "llama2": llama2_chat}


def builtin_dataset(chat_format: str | Callable = "chatml") -> tuple[list[dict], list[dict]]:
    """(train, test) records {"text", "messages", "name"}; text rendered with the chat format."""
    fmt = CHAT_FORMATS[chat_format] if isinstance(chat_format, str) else chat_format
    train, test = [], []
    for p in collect_pairs():
        msgs = [{"role": "user", "content": p["question"]}, {"role": "assistant", "content": p["answer"]}]
        rec = {"text": fmt(msgs), "messages": msgs, "name": p["name"]}
        (test if p["held_out"] else train).append(rec)
    return train, test
