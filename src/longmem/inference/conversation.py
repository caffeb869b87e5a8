"""A conversation whose memory grows with it: every finished exchange is read into the memory.

The prompt of each turn is the conversation's newest messages, as many as fit ``budget`` tokens, through
the backbone's chat template (``inference.chat``). Every finished exchange -- the new messages and the
answer, as the template writes them -- is then read into the memory, so what has left the prompt is still
there to recall. With a name the memory is a named memory (``Session``: on disk, crash-safe, reloaded
next time); without one it lives in RAM until ``save``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from longmem.errors import LongMemError
from longmem.inference.chat import chat_ids, exchange_text, normalise
from longmem.inference.generate import GenerationConfig, TextStream, stream
from longmem.inference.reader import read, tokenize
from longmem.inference.session import Session, forget, remember
from longmem.memory.io.named import check_name


@dataclass
class ChatStats:
    """Where a conversation stands."""

    exchanges: int  # finished exchanges
    prompt_messages: int  # messages the last prompt held
    memory_tokens: int  # tokens the memory holds
    memory: str | None  # the named memory, or None (RAM)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class Conversation:
    """A chat with a memory; see the module docstring."""

    def __init__(self, model, name: str | None = None, root: str | Path | None = None, system: str | None = None,
                 budget: int | None = None):
        if model.tokenizer is None or not getattr(model.tokenizer, "chat_template", None):
            raise LongMemError("this backbone's tokenizer has no chat template: chat needs an instruct model")
        self.model, self.root, self.system = model, root, system
        self.budget = budget or model.config.segment_length // 2  # prompt tokens; the rest is for the answer
        self.session = Session(model, check_name(name), root, create=True) if name else None
        self.memory = self.session.memory if self.session is not None else model.new_memory(1)
        self.messages: list[dict[str, str]] = []
        self.transcript: list[str] = []  # every exchange as it was remembered
        self._last_prompt = 0

    @property
    def name(self) -> str | None:
        return self.session.name if self.session is not None else None

    def prompt(self) -> torch.Tensor:
        """The newest messages that fit the budget (at least the last), through the chat template -> ids [N]."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        for first in range(len(self.messages)):
            ids = chat_ids(self.model.tokenizer, head + self.messages[first:])
            if len(ids) <= self.budget or first == len(self.messages) - 1:
                self._last_prompt = len(self.messages) - first
                return torch.tensor(ids[-self.budget:], dtype=torch.long, device="cpu")
        raise LongMemError("nothing to answer: say something first")

    def say(self, text: str, config: GenerationConfig | None = None) -> TextStream:
        """Add the user's message and stream the answer; call ``done`` with the answer's text afterwards."""
        self.messages.append(normalise([{"role": "user", "content": text}])[0])
        return stream(self.model, self.prompt(), self.memory, config or GenerationConfig(), copy_on_write=True)

    def done(self, answer: str) -> None:
        """Finish the exchange: the answer joins the messages, the exchange the memory."""
        exchange = exchange_text(self.model.tokenizer, self.messages, answer)
        self.messages.append({"role": "assistant", "content": answer})
        self.transcript.append(exchange)
        if self.session is not None:
            self.session.remember(exchange, source="chat")
            self.memory = self.session.memory
        else:
            read(self.model, tokenize(self.model, exchange), self.memory)

    def stats(self) -> ChatStats:
        return ChatStats(len(self.transcript), self._last_prompt, self.memory.num_tokens(), self.name)

    def save(self, name: str) -> None:
        """Keep this conversation in the named memory ``name`` (a RAM memory's exchanges are read into it)."""
        check_name(name)
        if name == self.name:
            return  # every exchange is on disk already
        remember(self.model, name, "".join(self.transcript), source="chat", root=self.root)

    def forget(self) -> None:
        """Start over: no messages, an empty memory (a named memory is deleted and made anew, empty)."""
        self.messages, self.transcript, self._last_prompt = [], [], 0
        if self.session is not None:
            name = self.session.name
            forget(name, self.root)
            self.session = Session(self.model, name, self.root, create=True)
            self.memory = self.session.memory
        else:
            self.memory = self.model.new_memory(1)
