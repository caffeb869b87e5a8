"""The HTTP service under load: concurrent clients, mixed requests, a restart, the server's memory.

16 clients (each its own session) send mixed requests through the real server in its own process: OpenAI
chat completions (whole, and streamed by the official ``openai`` client; some keep the exchange in the
session's memory), completions, and memory writes of new text. Then the server is stopped and started again,
and every session must hold exactly what it held before (every acknowledged write present). The server's
resident memory is sampled all along. Writes JSON (+ a PNG: memory over time, latency by kind).

    python bench/serve_load.py                                   # the packaged default, 16 x 32 requests
    python bench/serve_load.py --backbone DIR --sidenet fresh --segment 64   # any model longmem serve loads

The bounded test (``tests/test_serve_load.py``) runs the same driver (``run_load``) on a tiny model.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

KINDS = ("chat", "chat-stream", "chat-remember", "completion", "write")
WEIGHTS = (3, 3, 2, 2, 3)


def call(url: str, method: str, path: str, body=None, token: str | None = None) -> tuple[int, dict | None]:
    headers = {"content-type": "application/json"} | ({"authorization": f"Bearer {token}"} if token else {})
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            text = response.read().decode()
            return response.status, json.loads(text) if text else None
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read().decode() or "null")


def run_load(url: str, model: str, clients: int = 16, requests: int = 512, max_tokens: int = 8, seed: int = 0,
             token: str | None = None) -> dict:
    """Drive ``requests`` mixed requests from ``clients`` threads (session ``load-<i>`` each) -> a summary:
    errors, latencies by kind, and every session's stats after the last request."""
    import openai

    api = openai.OpenAI(base_url=url + "/v1", api_key=token or "none", max_retries=0, timeout=600)
    for c in range(clients):
        status, body = call(url, "POST", "/v1/sessions", {"name": f"load-{c}"}, token)
        if status != 201:
            raise RuntimeError(f"could not create session load-{c}: {status} {body}")
    rng = random.Random(seed)
    plan = [(i % clients, rng.choices(KINDS, WEIGHTS)[0], rng.randrange(10**6)) for i in range(requests)]
    latencies: dict[str, list[float]] = {k: [] for k in KINDS}
    errors: list[str] = []
    lock = threading.Lock()

    def one(client: int, kind: str, nonce: int) -> None:
        session = f"load-{client}"
        start = time.perf_counter()
        try:
            if kind == "write":
                text = f"Note {nonce} of client {client}: the keeper of the {nonce % 97}th lamp is called {nonce}."
                status, body = call(url, "POST", f"/v1/sessions/{session}/memory", {"text": text,
                                                                                    "source": f"n{nonce}"}, token)
                if status != 200:
                    raise RuntimeError(f"write {status}: {body}")
            elif kind == "completion":
                api.completions.create(model=model, prompt=f"Note {nonce} says", max_tokens=max_tokens,
                                       temperature=0, extra_body={"memory": session})
            else:
                messages = [{"role": "user", "content": f"What did note {nonce} of client {client} say?"}]
                extra = {"memory": session, "remember": kind == "chat-remember"}
                if kind == "chat-stream":
                    chunks = api.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                         temperature=0, stream=True, extra_body=extra)
                    "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                else:
                    api.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                temperature=0, extra_body=extra)
            with lock:
                latencies[kind].append(time.perf_counter() - start)
        except Exception as exc:  # every failure is counted, none stops the run
            with lock:
                errors.append(f"{kind}: {type(exc).__name__}: {exc}"[:300])

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(lambda job: one(*job), plan))
    seconds = time.perf_counter() - started
    stats = {f"load-{c}": call(url, "GET", f"/v1/sessions/load-{c}", token=token)[1] for c in range(clients)}
    return {"requests": requests, "clients": clients, "seconds": seconds, "requests_per_s": requests / seconds,
            "errors": errors, "by_kind": {k: {"count": len(v), "median_s": _median(v), "max_s": max(v, default=0.0)}
                                          for k, v in latencies.items()},
            "latencies": latencies, "sessions": stats}


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else 0.0


def same_after_restart(before: dict, after: dict) -> list[str]:
    """Sessions whose stats differ after a restart (tokens held and read, end position, revision)."""
    keys = ("tokens", "tokens_read", "end_position", "revision")
    return [name for name, b in before.items() if any(after.get(name, {}).get(k) != b.get(k) for k in keys)]


class ServerProcess:
    """``longmem serve`` in its own process, on a free loopback port."""

    def __init__(self, args: list[str], memory_dir: Path):
        env = os.environ | {"PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "longmem.cli", "serve", "--port", "0", "--memory-dir",
                                      str(memory_dir), *args], stderr=subprocess.PIPE, text=True, env=env)
        deadline = time.monotonic() + 600
        self.url = None
        while self.url is None:
            line = self.proc.stderr.readline()
            if not line and (self.proc.poll() is not None or time.monotonic() > deadline):
                raise RuntimeError("the server did not start")
            found = re.search(r"serving on (http://\S+)", line)
            if found:
                self.url = found.group(1)
        threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()  # drain

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=8, help="tokens per generation")
    parser.add_argument("--out", type=Path, default=Path("bench/results/serve-load.json"))
    args, model_args = parser.parse_known_args()  # the rest goes to longmem serve (--backbone, --sidenet, ...)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from longmem.evals.plots import pyplot, save_png
    from longmem.evals.results import git_commit

    with tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess(model_args, Path(tmp))
        model = call(server.url, "GET", "/v1/models")[1]["data"][0]["id"]
        samples, done = [], threading.Event()

        def sample() -> None:
            t0 = time.perf_counter()
            while not done.is_set():
                samples.append((time.perf_counter() - t0, server.rss_mb()))
                time.sleep(0.5)

        sampler = threading.Thread(target=sample, daemon=True)
        rss_start = server.rss_mb()
        sampler.start()
        result = run_load(server.url, model, args.clients, args.requests, args.max_tokens)
        done.set()
        sampler.join()
        server.stop()
        again = ServerProcess(model_args, Path(tmp))
        after = {name: call(again.url, "GET", f"/v1/sessions/{name}")[1] for name in result["sessions"]}
        again.stop()
    rss = [r for _, r in samples]
    half = rss[len(rss) // 2 :] or rss
    record = {
        "command": "python " + " ".join(sys.argv), "commit": git_commit(), "threads": os.cpu_count(),
        "model": model, "max_tokens": args.max_tokens, **{k: v for k, v in result.items() if k != "latencies"},
        "errors_count": len(result["errors"]), "changed_after_restart": same_after_restart(result["sessions"], after),
        "rss_mb": {"before_load": rss_start, "max": max(rss), "second_half_min": min(half), "second_half_max": max(half),
                   "end": rss[-1]},
        "rss_samples": samples,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    left.plot([t for t, _ in samples], rss)
    left.set_xlabel("seconds into the load")
    left.set_ylabel("server resident memory (MB)")
    left.set_title(f"{args.requests} requests, {args.clients} clients, {len(result['errors'])} errors", fontsize=10)
    kinds = [k for k in KINDS if result["latencies"][k]]
    right.boxplot([result["latencies"][k] for k in kinds], tick_labels=kinds)
    right.set_ylabel("latency (s)")
    right.tick_params(axis="x", labelsize=8)
    save_png(fig, args.out.with_suffix(".png"))
    print(json.dumps({k: record[k] for k in ("requests_per_s", "errors_count", "changed_after_restart", "rss_mb")}))
    return 0 if not result["errors"] and not record["changed_after_restart"] else 1


if __name__ == "__main__":
    sys.exit(main())
