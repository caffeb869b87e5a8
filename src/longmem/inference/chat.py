"""Chat messages through the backbone's own chat template.

An instruct backbone (SmolLM2-135M-Instruct, Gemma 3 270M's instruct variants) was tuned on conversations
in one format; its tokenizer carries that format as a Jinja template. ``chat_ids`` turns OpenAI-style
messages (``{"role": ..., "content": ...}``; content a string or a list of text parts) into the token ids
the model expects before its answer; ``exchange_text`` formats a finished exchange for a memory to keep.
"""

from __future__ import annotations

from collections.abc import Sequence

from longmem.errors import LongMemError

ROLES = ("system", "developer", "user", "assistant")


def message_text(message: dict, index: int = 0) -> tuple[str, str]:
    """One message -> (role, text); a clear error naming what is wrong with it."""
    if not isinstance(message, dict):
        raise LongMemError(f"messages[{index}] must be an object with 'role' and 'content'")
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        raise LongMemError(f"messages[{index}].role must be one of {', '.join(ROLES)}, not {role!r}")
    if isinstance(content, list):  # OpenAI's content parts: only text can be read here
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise LongMemError(f"messages[{index}].content[{j}]: only text parts are supported")
            parts.append(part["text"])
        content = "".join(parts)
    if not isinstance(content, str):
        raise LongMemError(f"messages[{index}].content must be a string or a list of text parts")
    return ("system" if role == "developer" else role), content


def normalise(messages: Sequence[dict]) -> list[dict[str, str]]:
    """Messages as the chat template reads them: [{"role", "content"}] with string contents."""
    if not messages:
        raise LongMemError("messages is empty: at least one message is needed")
    out = []
    for i, message in enumerate(messages):
        role, text = message_text(message, i)
        out.append({"role": role, "content": text})
    return out


def _template(tokenizer):
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise LongMemError("this backbone's tokenizer has no chat template: use plain text completion instead")
    return tokenizer


def chat_ids(tokenizer, messages: Sequence[dict]) -> list[int]:
    """Messages -> the ids of the conversation formatted by the tokenizer's chat template, ending with
    the prompt for the assistant's answer."""
    tokenizer = _template(tokenizer)
    ids = tokenizer.apply_chat_template(normalise(messages), add_generation_prompt=True, tokenize=True,
                                        return_dict=False)
    if ids and isinstance(ids[0], list):  # a batch of one
        ids = ids[0]
    return [int(i) for i in ids]


def exchange_text(tokenizer, messages: Sequence[dict], answer: str) -> str:
    """The newest exchange of a conversation -- its messages after the last assistant message, then the
    answer -- as the chat template writes it within the whole conversation: what a conversation memory keeps
    of one turn (the first turn with the conversation's system message; later turns without it)."""
    tokenizer = _template(tokenizer)
    turn = normalise(messages) + [{"role": "assistant", "content": answer}]
    last = max((i for i, m in enumerate(turn[:-1]) if m["role"] == "assistant"), default=-1)
    full = tokenizer.apply_chat_template(turn, tokenize=False)
    if last < 0:
        return full
    before = tokenizer.apply_chat_template(turn[: last + 1], tokenize=False)
    if full.startswith(before):
        return full[len(before) :]
    return tokenizer.apply_chat_template(turn[last + 1 :], tokenize=False)  # a template that is not prefix-stable
