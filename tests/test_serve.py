"""The HTTP service, started for real on loopback and spoken to over HTTP."""

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import byte_tokenizer, make_model, tiny_llama
from longmem.errors import LongMemError
from longmem.serve.app import ServeConfig, make_server

BOOK = "It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 3
SEA = "Call me Ishmael. Some years ago, never mind how long precisely, having little or no money. " * 3


def perturbed():
    """A tiny model whose SideNet is no identity, so a memory changes what it says."""
    model = make_model("llama", trained=True)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


class Running:
    """A server on 127.0.0.1 (any free port) in a background thread."""

    def __init__(self, root, token=None, max_request_bytes=1 << 16, model=None, keys=None):
        self.model = model or perturbed()
        config = ServeConfig(port=0, memory_dir=root, token=token, max_request_bytes=max_request_bytes, keys=keys)
        self.server = make_server(self.model, config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.server.started
        self.url, self.token = self.server.url, token

    def call(self, method, path, body=None, token=None, raw=False):
        headers = {"content-type": "application/json"}
        if token or self.token:
            headers["authorization"] = f"Bearer {token or self.token}"
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                text = resp.read().decode()
                return resp.status, text if raw else (json.loads(text) if text else None)
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read().decode() or "null")

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture
def running(tmp_path):
    server = Running(tmp_path)
    yield server
    server.stop()


def events(text):
    """Server-sent events -> [(event, data)]."""
    out = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        out.append((fields["event"], json.loads(fields["data"])))
    return out


def test_session_lifecycle_and_streamed_generation(running):
    assert running.call("GET", "/v1/health")[1]["status"] == "ok"
    status, made = running.call("POST", "/v1/sessions", {"name": "book"})
    assert status == 201 and made["name"] == "book" and made["tokens"] == 0
    assert running.call("POST", "/v1/sessions", {"name": "book"})[0] == 409
    status, added = running.call("POST", "/v1/sessions/book/memory", {"text": BOOK, "source": "austen"})
    assert status == 200 and added["tokens"] == len(BOOK) and added["memory"]["tokens"] > 0
    status, stream = running.call("POST", "/v1/sessions/book/generate",
                                  {"prompt": "It is", "max_tokens": 8, "stop": ["\n\n\n"]}, raw=True)
    got = events(stream)
    assert status == 200 and got[-1][0] == "done" and all(e == "token" for e, _ in got[:-1])
    done = got[-1][1]
    assert "".join(d["text"] for _, d in got[:-1]) == done["text"] and done["tokens"] == 8
    status, whole = running.call("POST", "/v1/sessions/book/generate",
                                 {"prompt": "It is", "max_tokens": 8, "stream": False})
    assert status == 200 and whole["text"] == done["text"]  # greedy: the same text either way
    stats = running.call("GET", "/v1/sessions/book")[1]
    assert stats["generations"] == 2 and stats["generated_tokens"] == 16
    assert stats["tokens_read"] == len(BOOK) and stats["memory_tokens_loaded"] == stats["tokens"]
    auto = running.call("POST", "/v1/sessions")[1]["name"]
    assert {s["name"] for s in running.call("GET", "/v1/sessions")[1]["sessions"]} == {"book", auto}
    assert running.call("DELETE", "/v1/sessions/book")[0] == 204
    assert running.call("GET", "/v1/sessions/book")[0] == 404
    assert running.call("DELETE", "/v1/sessions/book")[0] == 404


def test_bad_requests_get_clear_errors(running):
    running.call("POST", "/v1/sessions", {"name": "s"})
    status, body = running.call("POST", "/v1/sessions", {"name": "../etc"})
    assert status == 400 and "bad memory name" in body["error"]
    assert running.call("POST", "/v1/sessions/nope/generate", {"prompt": "x"})[0] == 404
    assert running.call("POST", "/v1/sessions/s/generate", {"prompt": ""})[0] == 422
    status, body = running.call("POST", "/v1/sessions/s/generate", {"prompt": "x", "top_p": 2.0})
    assert status == 400 and "top_p" in body["error"]
    status, body = running.call("POST", "/v1/sessions/s/generate", {"prompt": "x", "max_tokens": 10**6})
    assert status == 400 and "limit" in body["error"]


def test_request_size_is_limited(running):
    running.call("POST", "/v1/sessions", {"name": "s"})
    status, body = running.call("POST", "/v1/sessions/s/memory", {"text": "x" * (1 << 17)})
    assert status == 413 and "exceeds" in body["error"]
    host, port = running.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)  # no declared length: chunked upload
    chunks = (b'{"text": "' + b"y" * 4096 * 40 + b'"}',)
    conn.request("POST", "/v1/sessions/s/memory", body=iter(chunks), headers={"content-type": "application/json"},
                 encode_chunked=True)
    assert conn.getresponse().status == 413
    conn.close()
    assert running.call("GET", "/v1/sessions/s")[1]["tokens_read"] == 0  # nothing half-written


def test_concurrent_requests_never_mix_sessions(running):
    for name, text in (("a", BOOK), ("b", SEA)):
        running.call("POST", "/v1/sessions", {"name": name})
        running.call("POST", f"/v1/sessions/{name}/memory", {"text": text})
    ask = {"prompt": "The", "max_tokens": 12, "stream": False}
    alone = {name: running.call("POST", f"/v1/sessions/{name}/generate", ask)[1]["text"] for name in "ab"}
    assert alone["a"] != alone["b"]  # the memories make a difference
    jobs = ["a", "b"] * 4
    with ThreadPoolExecutor(len(jobs) + 1) as pool:
        futures = [pool.submit(running.call, "POST", f"/v1/sessions/{n}/generate", ask) for n in jobs]
        writer = pool.submit(running.call, "POST", "/v1/sessions/c", None)  # 404 while others run
        results = [f.result() for f in futures]
    assert writer.result()[0] in (404, 405)
    for name, (status, body) in zip(jobs, results):
        assert status == 200 and body["text"] == alone[name]


def test_memories_survive_a_restart(tmp_path):
    first = Running(tmp_path)
    first.call("POST", "/v1/sessions", {"name": "book"})
    first.call("POST", "/v1/sessions/book/memory", {"text": BOOK})
    ask = {"prompt": "It is", "max_tokens": 10, "stream": False}
    before = first.call("POST", "/v1/sessions/book/generate", ask)[1]["text"]
    stats = first.call("GET", "/v1/sessions/book")[1]
    first.stop()
    second = Running(tmp_path)  # a new process would load the same files
    try:
        again = second.call("GET", "/v1/sessions/book")[1]
        assert again["tokens"] == stats["tokens"] and again["end_position"] == stats["end_position"]
        assert second.call("POST", "/v1/sessions/book/generate", ask)[1]["text"] == before
    finally:
        second.stop()


def test_bearer_token(tmp_path):
    server = Running(tmp_path, token="s3cret")
    try:
        assert server.call("GET", "/v1/sessions")[0] == 200
        assert server.call("GET", "/v1/sessions", token="wrong")[0] == 401
        req = urllib.request.Request(server.url + "/v1/sessions")
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(req, timeout=30)
        assert info.value.code == 401
    finally:
        server.stop()


def test_other_addresses_need_a_token(monkeypatch):
    monkeypatch.delenv("LONGMEM_TOKEN", raising=False)
    for host in ("0.0.0.0", "192.168.1.5", "::", "example.org"):
        with pytest.raises(LongMemError, match="refusing to bind"):
            ServeConfig(host=host).check()
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        ServeConfig(host=host).check()
    ServeConfig(host="0.0.0.0", token="t").check()
    monkeypatch.setenv("LONGMEM_TOKEN", "from-env")
    config = ServeConfig(host="0.0.0.0")
    config.check()
    assert config.token == "from-env"


def test_longmem_serve_command(tmp_path):
    """The real command in its own process: starts, serves, stops on SIGTERM; refuses 0.0.0.0."""
    backbone = tmp_path / "tiny"
    tiny_llama().save_pretrained(backbone)
    byte_tokenizer().save_pretrained(backbone)
    env = {k: v for k, v in os.environ.items() if k != "LONGMEM_TOKEN"} | {"LONGMEM_HOME": str(tmp_path / "home")}
    cmd = [sys.executable, "-m", "longmem.cli", "serve", "--backbone", str(backbone), "--dtype", "float32",
           "--segment", "32", "--memory-size", "128"]
    refused = subprocess.run(cmd + ["--host", "0.0.0.0"], capture_output=True, text=True, env=env, timeout=120)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "refusing to bind" in refused.stderr
    proc = subprocess.Popen(cmd + ["--port", "0"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stderr.readline()
        while line.startswith("WARNING"):  # e.g. no trained SideNet ships for this tiny backbone
            line = proc.stderr.readline()
        assert "serving on http://127.0.0.1:" in line, line
        url = line.split("serving on ")[1].strip()
        req = urllib.request.Request(url + "/v1/sessions", data=b'{"name": "x"}', method="POST",
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert resp.status == 201
        assert (tmp_path / "home" / "memories" / "x" / "manifest.json").is_file()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it handled
