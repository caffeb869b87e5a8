"""HTTP service: sessions, each with its own persistent memory, and streamed generation.

Endpoints (JSON; with a token every request needs ``Authorization: Bearer TOKEN``):

  GET    /v1/health                      model identity
  GET    /v1/sessions                    every session (named memory) with its stats
  POST   /v1/sessions                    {"name"?} -> a new session (201; 409 if it exists)
  GET    /v1/sessions/{name}             stats of one session
  DELETE /v1/sessions/{name}             delete it and its memory (204)
  POST   /v1/sessions/{name}/memory      {"text", "source"?} -> read the text into its memory
  DELETE /v1/sessions/{name}/memory?source=S   remove every text read from source S
  POST   /v1/sessions/{name}/generate    {"prompt", "max_tokens", "temperature", "top_p", "stop",
                                          "seed", "stream"} -> server-sent events or one JSON
  GET    /v1/models, POST /v1/completions, POST /v1/chat/completions
                                         OpenAI-compatible (``serve/openai.py``; errors in OpenAI's shape)

A session is a named memory on disk (the same ones ``longmem remember`` writes), so
sessions survive a restart. One model serves every session: a lock lets one computation
(a token step or one segment of reading) run at a time, so concurrent requests
interleave and never see each other's state. The server binds 127.0.0.1 unless given a
bearer token, and refuses request bodies over ``max_request_bytes`` (413).
"""

from __future__ import annotations

import ctypes
import hmac
import ipaddress
import json
import os
import sys
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field

from longmem.errors import LongMemError
from longmem.inference.generate import GenerationConfig
from longmem.memory.io.named import NamedMemory, check_name
from longmem.model.longmem import LongMemModel
from longmem.inference.session import Session, forget, list_memories, memory_header, memory_root
from longmem.serve import openai
from longmem.serve.keys import ANYONE, Keys, Tenant


@dataclass
class ServeConfig:
    """Where and how the service listens."""

    host: str = "127.0.0.1"
    """Address to bind; anything but loopback needs a token."""
    port: int = 8000
    """TCP port (0: any free port; the chosen one is printed)."""
    token: str | None = None
    """Bearer token clients must send (None: $LONGMEM_TOKEN, else no authentication); it sees every session."""
    keys: Path | None = None
    """A keys file of tenants (``serve/keys.py``): hashed keys, each seeing only the sessions it names."""
    memory_dir: Path | None = None
    """Where the sessions' memories live (None: $LONGMEM_HOME/memories)."""
    max_request_bytes: int = 8 << 20
    """Largest request body accepted."""
    max_new_tokens: int = 4096
    """Most tokens one generate request may ask for."""
    max_sessions: int = 32
    """Most sessions kept loaded in RAM; the least recently used beyond it are unloaded (they stay on disk), so
    the number of loaded memories does not grow with the number of sessions."""

    def check(self) -> None:
        """Resolve the token and refuse unsafe or bad settings."""
        self.token = self.token or os.environ.get("LONGMEM_TOKEN") or None
        if not _is_loopback(self.host) and not self.token and self.keys is None:
            raise LongMemError(f"refusing to bind {self.host}: only loopback addresses may serve without a "
                               "bearer token (pass --token, --keys, or set LONGMEM_TOKEN)")
        if not 0 <= self.port <= 65535:
            raise LongMemError(f"port {self.port} is not in 0..65535")
        if self.keys is not None:
            Keys.load(self.keys)  # a bad keys file is refused before a model loads
        if self.max_sessions <= 0:
            raise LongMemError(f"max_sessions={self.max_sessions} must be positive")
        if self.max_request_bytes <= 0:
            raise LongMemError(f"max_request_bytes={self.max_request_bytes} must be positive")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Sessions:
    """The sessions of one model, loaded from disk on first use."""

    def __init__(self, model: LongMemModel, root: Path, max_loaded: int = 32):
        self.model, self.root, self.max_loaded = model, root, max_loaded
        self.compute = threading.Lock()  # one model computation at a time
        self._guard = threading.Lock()
        self._loaded: OrderedDict[str, Session] = OrderedDict()  # least recently used first
        self._loading: dict[str, threading.Lock] = {}
        self.counters: dict[str, dict] = {}
        self.header = memory_header(model)

    def get(self, name: str, tenant: Tenant = ANYONE) -> Session:
        check_name(name)
        if not tenant.may(name):  # another tenant's session answers as if it did not exist
            raise NotFound(f"no session {name!r}")
        if not (self.root / name / "manifest.json").is_file():
            raise NotFound(f"no session {name!r}")
        with self._guard:
            lock = self._loading.setdefault(name, threading.Lock())
        with lock:
            session = self._loaded.get(name)
            if session is None or not session.store.exists():
                session = Session(self.model, name, self.root, create=False, lock=self.compute)
            elif int(session.store.manifest()["revision"]) != session.revision:  # written by another process,
                session.reload()  # or by a copy of this session unloaded while it was still in use
            with self._guard:
                self._loaded[name] = session
                self._loaded.move_to_end(name)
                while len(self._loaded) > self.max_loaded:  # unloaded from RAM; a running request keeps its copy
                    self._loaded.popitem(last=False)
            return session

    def create(self, name: str, tenant: Tenant = ANYONE) -> Session:
        if not tenant.may(check_name(name)):
            raise Forbidden(f"key {tenant.name!r} may not create session {name!r} (its sessions: "
                            f"{', '.join(tenant.sessions)})")
        store = NamedMemory(self.root / check_name(name))
        with store.lock():
            if store.exists():
                raise Conflict(f"session {name!r} exists")
            store.create(self.header)
        return self.get(name)

    def delete(self, name: str, tenant: Tenant = ANYONE) -> None:
        check_name(name)
        if not tenant.may(name) or not (self.root / name).is_dir():
            raise NotFound(f"no session {name!r}")
        forget(name, self.root)
        with self._guard:
            self._loaded.pop(name, None)
            self.counters.pop(name, None)

    def count(self, name: str, tokens: int) -> None:
        with self._guard:
            c = self.counters.setdefault(name, {"generations": 0, "generated_tokens": 0})
            c["generations"] += 1
            c["generated_tokens"] += tokens

    def stats(self, name: str, tenant: Tenant = ANYONE) -> dict:
        session = self.get(name, tenant)
        counters = self.counters.get(name, {"generations": 0, "generated_tokens": 0})
        return session.info().to_dict() | counters | {"memory_tokens_loaded": session.memory.num_tokens()}


class Conflict(LongMemError):
    """The thing to create exists already."""


class Unauthorized(LongMemError):
    """No or a wrong bearer token."""


class Forbidden(LongMemError):
    """A valid key asking for what its tenant may not do."""


class NotFound(LongMemError):
    """No such session."""


class NewSession(BaseModel):
    name: str | None = Field(default=None, description="session name (default: a random one)")


class Text(BaseModel):
    text: str = Field(min_length=1, description="text to read into the session's memory")
    source: str = Field(default="", description="where it came from (kept in the memory's log)")


class Generate(BaseModel):
    prompt: str = Field(min_length=1)
    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = []
    seed: int | None = None
    stream: bool = True


def build_app(model: LongMemModel, config: ServeConfig):
    """The ASGI application (FastAPI inside a request-size limit)."""
    config.check()
    sessions = Sessions(model, memory_root(config.memory_dir), config.max_sessions)
    keys = Keys.load(config.keys) if config.keys is not None else None

    def authorize(request: Request) -> None:
        request.state.tenant = ANYONE
        if config.token is None and keys is None:
            return
        given = request.headers.get("authorization", "")
        bearer = given[len("Bearer "):] if given.startswith("Bearer ") else ""
        tenant = keys.tenant(bearer) if keys is not None else None  # every entry compared
        if config.token is not None and hmac.compare_digest(given.encode(), f"Bearer {config.token}".encode()):
            tenant = ANYONE
        if tenant is None:
            raise Unauthorized("missing or wrong bearer token")
        request.state.tenant = tenant

    def tenant_of(request: Request) -> Tenant:
        return request.state.tenant

    app = FastAPI(title="longmem", dependencies=[Depends(authorize)])

    @app.exception_handler(LongMemError)
    def _error(request: Request, exc: LongMemError):
        status = {Unauthorized: 401, Forbidden: 403, Conflict: 409, NotFound: 404,
                  openai.UnknownModel: 404}.get(type(exc), 400)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        if openai.is_openai_path(request.url.path):
            code = {Unauthorized: "invalid_api_key", openai.UnknownModel: "model_not_found",
                    NotFound: "session_not_found"}.get(type(exc))
            body = openai.openai_error(status, str(exc), getattr(exc, "param", None), code)
            return JSONResponse(body, status_code=status, headers=headers)
        return JSONResponse({"error": str(exc)}, status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid request")
        if openai.is_openai_path(request.url.path):
            return JSONResponse(openai.openai_error(400, message, where), status_code=400)
        return JSONResponse({"error": message}, status_code=422)

    @app.get("/v1/health")
    def health():
        return {"status": "ok", "backbone": model.config.backbone} | {
            k: sessions.header[k] for k in ("backbone_fingerprint", "sidenet_fingerprint")}

    @app.get("/v1/sessions")
    def list_sessions(tenant: Tenant = Depends(tenant_of)):
        return {"sessions": [m.to_dict() for m in list_memories(sessions.root) if tenant.may(m.name)]}

    @app.post("/v1/sessions", status_code=201)
    def create_session(body: NewSession | None = None, tenant: Tenant = Depends(tenant_of)):
        own = "session" if tenant is ANYONE else f"{tenant.name}-session"
        name = (body.name if body else None) or f"{own}-{uuid.uuid4().hex[:12]}"
        session = sessions.create(name, tenant)
        return session.info().to_dict()

    @app.get("/v1/sessions/{name}")
    def session_stats(name: str, tenant: Tenant = Depends(tenant_of)):
        return sessions.stats(name, tenant)

    @app.delete("/v1/sessions/{name}", status_code=204)
    def delete_session(name: str, tenant: Tenant = Depends(tenant_of)):
        sessions.delete(name, tenant)
        return Response(status_code=204)

    @app.post("/v1/sessions/{name}/memory")
    def add_text(name: str, body: Text, tenant: Tenant = Depends(tenant_of)):
        return sessions.get(name, tenant).remember(body.text, source=body.source).to_dict()

    @app.delete("/v1/sessions/{name}/memory")
    def forget_text(name: str, source: str, tenant: Tenant = Depends(tenant_of)):
        return sessions.get(name, tenant).forget_source(source).to_dict()

    @app.post("/v1/sessions/{name}/generate")
    def generate(name: str, body: Generate, tenant: Tenant = Depends(tenant_of)):
        if body.max_tokens > config.max_new_tokens:
            raise LongMemError(f"max_tokens={body.max_tokens} exceeds this server's limit {config.max_new_tokens}")
        gen = GenerationConfig(max_new_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p,
                               stop=body.stop, seed=body.seed)
        pieces = sessions.get(name, tenant).stream(body.prompt, gen)
        if not body.stream:
            text = "".join(pieces)
            sessions.count(name, pieces.result.tokens)
            return pieces.result.to_dict() | {"text": text}

        def events():
            try:
                for piece in pieces:
                    yield _sse("token", {"text": piece})
                sessions.count(name, pieces.result.tokens)
                yield _sse("done", pieces.result.to_dict())
            except LongMemError as exc:
                yield _sse("error", {"error": str(exc)})

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    openai.add_routes(app, model, sessions, config.max_new_tokens, tenant_of)
    return BodyLimit(app, config.max_request_bytes)


def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


class BodyLimit:
    """ASGI middleware: 413 for request bodies over ``limit`` bytes, declared or chunked."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:  # the HTTP server holds the client to its declared length
            if not declared.isdigit() or int(declared) > self.limit:
                return await self._reject(send, scope.get("path", ""))
            return await self.app(scope, receive, send)
        body, more = b"", True  # no declared length: read up to the limit before the app sees it
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                return await self._reject(send, scope.get("path", ""))
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _reject(self, send, path: str = "") -> None:
        message = f"request body exceeds {self.limit} bytes"
        body = json.dumps(openai.openai_error(413, message) if openai.is_openai_path(path) else {"error": message})
        body = body.encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class Server(uvicorn.Server):
    """uvicorn's server that prints the address it listens on once ready."""

    async def startup(self, sockets=None):
        await super().startup(sockets)
        if self.servers:
            print(f"longmem: serving on {self.url}", file=sys.stderr, flush=True)

    @property
    def url(self) -> str:
        host, port = self.servers[0].sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"


def make_server(model: LongMemModel, config: ServeConfig) -> Server:
    """A ready-to-run server (``.run()`` blocks; set ``.should_exit`` to stop it)."""
    return Server(uvicorn.Config(build_app(model, config), host=config.host, port=config.port,
                                 log_level="warning", timeout_graceful_shutdown=5))


def fewer_arenas(arenas: int = 2) -> bool:
    """Limit glibc's malloc to ``arenas`` arenas (its default grows with the threads, 8 per core), each of
    which holds on to freed memory: under 16 concurrent clients (bench/serve_load.py, one run each) the
    server's peak resident memory was 6.7 GB with the default, 5.8 GB with this call at startup and 4.9 GB
    with MALLOC_ARENA_MAX=2 set before the process starts. False where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-8, arenas))  # M_ARENA_MAX
    except (OSError, AttributeError):
        return False


def serve(model: LongMemModel, config: ServeConfig) -> None:
    """Run the service until interrupted."""
    fewer_arenas()
    make_server(model, config).run()
