"""Chat prompt formats.

* :func:`render_chat_template` renders a checkpoint's own ``chat_template`` (a jinja2 string from
  ``tokenizer_config.json``) the way transformers' ``apply_chat_template`` does: a sandboxed environment with
  ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension, a ``tojson`` filter that does not escape
  HTML, and the globals ``raise_exception`` and ``strftime_now``.
* Llama 2 chat (Meta's ``[INST]`` format), as a string and as Meta's reference token ids::

      <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user_1} [/INST] {assistant_1} </s><s>[INST] {user_2} [/INST]

  :data:`LLAMA2_CHAT_TEMPLATE` is the same format as the jinja template Llama-2-chat checkpoints ship.
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"

LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)


@lru_cache(maxsize=16)
def _compile(template: str):
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def render_chat_template(template: str, messages: list[dict[str, Any]], add_generation_prompt: bool = False,
                         **context: Any) -> str:
    """Render ``messages`` ([{"role": ..., "content": ...}, ...]) with a jinja2 chat template; ``context`` holds
    the special tokens (``bos_token``, ``eos_token``, ...) and any template variables."""
    for m in messages:
        if not isinstance(m, dict) or "role" not in m:
            raise TypeError(f"chat messages must be dicts with 'role' and 'content', got {m!r}")
    return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **context)


def _split_system(messages: list[dict[str, str]]) -> tuple[str | None, list[dict[str, str]]]:
    if messages and messages[0]["role"] == "system":
        return messages[0]["content"], messages[1:]
    return None, messages


def _check_alternation(turns: list[dict[str, str]]) -> None:
    for i, m in enumerate(turns):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            raise ValueError(f"Llama 2 chat: message {i} has role {m['role']!r}, expected {want!r} "
                             "(roles must alternate user/assistant, after an optional system message)")


def llama2_chat_prompt(messages: list[dict[str, str]], bos_token: str = "<s>", eos_token: str = "</s>") -> str:
    """The Llama 2 chat prompt as text, identical to rendering :data:`LLAMA2_CHAT_TEMPLATE`; tokenize it with
    ``add_special_tokens=False`` (the text carries its own ``<s>``)."""
    system, turns = _split_system(messages)
    _check_alternation(turns)
    out = []
    for i, m in enumerate(turns):
        content = m["content"]
        if i == 0 and system is not None:
            content = B_SYS + system + E_SYS + content
        if m["role"] == "user":
            out.append(f"{bos_token}{B_INST} {content.strip()} {E_INST}")
        else:
            out.append(f" {content.strip()} {eos_token}")
    return "".join(out)


def llama2_chat_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Meta's reference encoding (llama/generation.py ``chat_completion``): each finished exchange is
    ``[BOS] + encode("[INST] {user} [/INST] {answer} ") + [EOS]``, the open user turn
    ``[BOS] + encode("[INST] {user} [/INST]")``; the system prompt is folded into the first user message."""
    system, turns = _split_system(messages)
    _check_alternation(turns)
    if not turns or turns[-1]["role"] != "user":
        raise ValueError("Llama 2 chat: the last message must be from the user")
    turns = [dict(m) for m in turns]
    if system is not None:
        turns[0]["content"] = B_SYS + system + E_SYS + turns[0]["content"]
    ids: list[int] = []
    for user, answer in zip(turns[::2], turns[1::2]):
        text = f"{B_INST} {user['content'].strip()} {E_INST} {answer['content'].strip()} "
        ids += [tokenizer.bos_id] + tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_id]
    last = f"{B_INST} {turns[-1]['content'].strip()} {E_INST}"
    return ids + [tokenizer.bos_id] + tokenizer.encode(last, add_special_tokens=False)
