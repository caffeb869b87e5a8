"""OpenAI-compatible endpoints beside the service's own, so that existing clients work unchanged.

  GET  /v1/models                 the one model served (its id: ``longmem-<backbone>``)
  GET  /v1/models/{id}
  POST /v1/completions            {"model", "prompt", "max_tokens", "temperature", "top_p", "stop", "seed",
                                   "stream", "stream_options"} -> a text completion
  POST /v1/chat/completions       {"model", "messages", ...} -> the messages through the backbone's chat
                                   template, the assistant's answer

Two documented extra fields (the OpenAI Python client sends them with ``extra_body=``):

* ``memory``: the session (named memory) to read while generating; none: an empty memory.
* ``explain``: the response gets ``provenance``, per generated token the memory entries it drew on (the
  copied token's and the most-attended entry's source and character span; see ``explain_token``).
* ``remember``: with ``memory``, keep the finished exchange in that session's memory, so that a later
  conversation recalls what this one said after it has left the window (for chat: the newest turn -- the
  messages after the last assistant message, and the answer -- as the chat template writes it; for a
  completion: the prompt and the completion).

Streams are OpenAI's server-sent chunks ending with ``data: [DONE]``; errors have OpenAI's shape
(``{"error": {"message", "type", "param", "code"}}``). Fields OpenAI defines that this server cannot honour
(``n`` > 1, ``logprobs``, ``echo``, tools, penalties, ``logit_bias``, a non-text ``response_format``) are
refused by name; other unknown fields are ignored, as many OpenAI-compatible servers do.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

import torch
from fastapi import Depends, FastAPI
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from longmem.errors import LongMemError
from longmem.inference.chat import chat_ids, exchange_text, normalise
from longmem.inference.generate import GenerationConfig, TextStream, stream
from longmem.inference.session import with_sources

PATHS = ("/v1/models", "/v1/completions", "/v1/chat/completions")
FINISH = {"eos": "stop", "stop": "stop", "length": "length"}  # our finish reasons -> OpenAI's
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error"}


def is_openai_path(path: str) -> bool:
    """Whether a request path is one of these endpoints (its errors then take OpenAI's shape)."""
    return any(path == p or path.startswith(p + "/") for p in PATHS)


def openai_error(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error body."""
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param,
                      "code": code}}


class Unsupported(LongMemError):
    """A field OpenAI defines that this server cannot honour (400, naming the field)."""

    def __init__(self, param: str, why: str):
        super().__init__(f"{param}: {why}")
        self.param = param


class UnknownModel(LongMemError):
    """A model id this server does not serve (404)."""


class _Request(BaseModel):
    """The fields both endpoints share."""

    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = 1
    logprobs: Any = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    memory: str | None = Field(default=None, description="session (named memory) to read (extra field)")
    remember: bool = Field(default=False, description="keep the finished exchange in that memory (extra field)")
    explain: bool = Field(default=False, description="return each token's memory provenance (extra field)")

    def check(self) -> None:
        for name, default in (("n", 1), ("logprobs", None), ("presence_penalty", 0.0),
                              ("frequency_penalty", 0.0), ("logit_bias", None)):
            value = getattr(self, name)
            if value not in (default, False, {}):
                raise Unsupported(name, f"{value!r} is not supported by this server (only {default!r})")
        if self.remember and self.memory is None:
            raise Unsupported("remember", "needs a session to keep the exchange in: name it in 'memory'")

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise Unsupported("stop", "up to 4 non-empty strings")
        return stops


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int]
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def check(self) -> None:
        super().check()
        if self.echo or self.best_of not in (None, 1) or self.suffix:
            raise Unsupported("echo" if self.echo else "best_of" if self.best_of not in (None, 1) else "suffix",
                              "not supported by this server")


class ChatRequest(_Request):
    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    def check(self) -> None:
        super().check()
        if self.tools:
            raise Unsupported("tools", "tool calls are not supported by this server")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise Unsupported("response_format", "only text")


def add_routes(app: FastAPI, model, sessions, max_new_tokens: int, tenant_of) -> None:
    """Mount the OpenAI-compatible endpoints on ``app`` (``sessions``: the service's ``Sessions``;
    ``tenant_of``: the dependency giving the asking tenant, whose sessions alone a request may name)."""
    model_id = f"longmem-{model.config.backbone}"
    created = int(time.time())
    card = {"id": model_id, "object": "model", "created": created, "owned_by": "longmem"}

    def served(name: str) -> None:
        if name != model_id:
            raise UnknownModel(f"model {name!r} is not served here; this server serves {model_id!r}")

    def settings(body: _Request, default_max: int) -> GenerationConfig:
        body.check()
        served(body.model)
        wanted = getattr(body, "max_completion_tokens", None) or body.max_tokens or default_max
        if wanted > max_new_tokens:
            raise Unsupported("max_tokens", f"{wanted} exceeds this server's limit {max_new_tokens}")
        return GenerationConfig(max_new_tokens=wanted, temperature=body.temperature, top_p=body.top_p,
                                stop=body.stops(), seed=body.seed, explain=body.explain)

    def session_of(body: _Request, tenant):
        """The session a request reads (once per request), or None."""
        return sessions.get(body.memory, tenant) if body.memory is not None else None

    def run(session, prompt: str | torch.Tensor, config: GenerationConfig) -> TextStream:
        if session is not None:
            return session.stream(prompt, config)
        return stream(model, prompt, None, config, lock=sessions.compute)

    def keep(body: _Request, session, text: str) -> None:
        if body.remember:
            session.remember(text, source="conversation")

    @app.get("/v1/models")
    def list_models():
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{name}")
    def get_model(name: str):
        served(name)
        return card

    @app.post("/v1/completions")
    def completions(body: CompletionRequest, tenant=Depends(tenant_of)):
        config = settings(body, default_max=16)
        session = session_of(body, tenant)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise Unsupported("prompt", "one prompt per request")
            prompt = prompt[0]
        if isinstance(prompt, str):
            if not prompt:
                raise Unsupported("prompt", "is empty")
            pieces = run(session, prompt, config)  # tokenised as `longmem generate` does
        else:
            vocab = len(model.tokenizer)
            if not prompt or any(not 0 <= i < vocab for i in prompt):
                raise Unsupported("prompt", f"token ids must be in 0..{vocab - 1}")
            pieces = run(session, torch.tensor(prompt, dtype=torch.long, device="cpu"), config)
        reply = Reply("cmpl", "text_completion", model_id, sessions, body, session)
        text_of = prompt if isinstance(prompt, str) else model.tokenizer.decode(prompt)
        if body.stream:
            return reply.streamed(pieces, lambda text: {"text": text, "index": 0, "logprobs": None},
                                  lambda text: keep(body, session, text_of + text))
        text = "".join(pieces)
        keep(body, session, text_of + text)
        return reply.whole(pieces, {"text": text, "index": 0, "logprobs": None})

    @app.post("/v1/chat/completions")
    def chat_completions(body: ChatRequest, tenant=Depends(tenant_of)):
        config = settings(body, default_max=max_new_tokens)
        messages = normalise(body.messages)
        session = session_of(body, tenant)
        ids = torch.tensor(chat_ids(model.tokenizer, messages), dtype=torch.long, device="cpu")
        pieces = run(session, ids, config)
        reply = Reply("chatcmpl", "chat.completion", model_id, sessions, body, session)
        if body.stream:
            return reply.streamed(pieces, lambda text: {"index": 0, "delta": {"content": text}, "logprobs": None},
                                  lambda text: keep(body, session, exchange_text(model.tokenizer, messages, text)),
                                  first={"index": 0, "delta": {"role": "assistant", "content": ""},
                                         "logprobs": None})
        text = "".join(pieces)
        keep(body, session, exchange_text(model.tokenizer, messages, text))
        return reply.whole(pieces, {"index": 0, "message": {"role": "assistant", "content": text},
                                    "logprobs": None})


class Reply:
    """One response, whole or as OpenAI's server-sent chunks."""

    def __init__(self, prefix: str, kind: Literal["text_completion", "chat.completion"], model_id: str, sessions,
                 body: _Request, session):
        self.id = f"{prefix}-{uuid.uuid4().hex[:24]}"
        self.kind, self.model_id, self.sessions, self.body, self.session = kind, model_id, sessions, body, session
        self.created = int(time.time())

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model_id}

    def _usage(self, pieces: TextStream) -> dict:
        result = pieces.result
        return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.tokens,
                "total_tokens": result.prompt_tokens + result.tokens}

    def _count(self, pieces: TextStream) -> None:
        if self.body.memory is not None:
            self.sessions.count(self.body.memory, pieces.result.tokens)

    def _provenance(self, pieces: TextStream) -> dict:
        """The extra field ``provenance`` (``explain``): per generated token, the memory entries it drew on."""
        if not self.body.explain:
            return {}
        entries = pieces.result.provenance or []
        if self.session is not None:
            entries = with_sources(entries, self.session.store)
        return {"provenance": entries}

    def whole(self, pieces: TextStream, choice: dict) -> dict:
        self._count(pieces)
        choice["finish_reason"] = FINISH[pieces.result.finish_reason]
        return self._head(self.kind) | {"choices": [choice], "usage": self._usage(pieces)} | self._provenance(pieces)

    def streamed(self, pieces: TextStream, chunk_of, on_end, first: dict | None = None) -> StreamingResponse:
        kind = self.kind + ".chunk" if self.kind == "chat.completion" else self.kind
        usage = bool((self.body.stream_options or {}).get("include_usage"))

        def chunk(choices: list[dict], **extra) -> str:
            return "data: " + json.dumps(self._head(kind) | {"choices": choices} | extra) + "\n\n"

        def events():
            try:
                if first is not None:
                    yield chunk([first | {"finish_reason": None}])
                text = []
                for piece in pieces:
                    text.append(piece)
                    yield chunk([chunk_of(piece) | {"finish_reason": None}])
                last = chunk_of("")
                if "delta" in last:
                    last["delta"] = {}
                yield chunk([last | {"finish_reason": FINISH[pieces.result.finish_reason]}], **self._provenance(pieces))
                self._count(pieces)
                on_end("".join(text))
                if usage:
                    yield chunk([], usage=self._usage(pieces))
            except LongMemError as exc:
                yield "data: " + json.dumps(openai_error(400, str(exc))) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
