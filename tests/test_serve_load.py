"""A bounded load test of the HTTP service: 16 clients, 512 mixed requests, 0 errors, every write kept."""

import importlib.util
from pathlib import Path

import pytest

from longmem.errors import LongMemError
from longmem.serve.app import ServeConfig, Sessions
from test_serve import Running, perturbed

spec = importlib.util.spec_from_file_location("serve_load", Path(__file__).parents[1] / "bench" / "serve_load.py")
serve_load = importlib.util.module_from_spec(spec)
spec.loader.exec_module(serve_load)


def test_sixteen_clients_five_hundred_requests_no_errors_and_every_write_survives(tmp_path):
    server = Running(tmp_path)
    server.model.tokenizer.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>"
                                            "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    try:
        result = serve_load.run_load(server.url, "longmem-tiny-llama", clients=16, requests=512, max_tokens=4)
    finally:
        server.stop()
    assert result["errors"] == [], result["errors"][:3]
    assert all(result["by_kind"][k]["count"] > 0 for k in serve_load.KINDS)
    writes = result["by_kind"]["write"]["count"] + result["by_kind"]["chat-remember"]["count"]
    assert sum(s["revision"] for s in result["sessions"].values()) == writes  # every acknowledged write, once
    again = Running(tmp_path, model=server.model)  # a restart: the same files loaded anew
    try:
        after = {name: again.call("GET", f"/v1/sessions/{name}")[1] for name in result["sessions"]}
    finally:
        again.stop()
    assert serve_load.same_after_restart(result["sessions"], after) == []


def test_sessions_beyond_the_limit_are_unloaded_and_still_served(tmp_path):
    sessions = Sessions(perturbed(), tmp_path, max_loaded=2)
    for name in "abc":
        sessions.create(name)
        sessions.get(name).remember(f"text of {name} " * 4)
    assert list(sessions._loaded) == ["b", "c"]  # the least recently used went
    assert sessions.get("a").info().tokens_read == len("text of a " * 4)  # reloaded from disk
    assert list(sessions._loaded) == ["c", "a"]
    with pytest.raises(LongMemError, match="max_sessions"):
        ServeConfig(max_sessions=0).check()


def test_a_session_written_elsewhere_is_reloaded(tmp_path):
    from longmem.inference.session import remember

    model = perturbed()
    sessions = Sessions(model, tmp_path)
    sessions.create("s")
    before = sessions.get("s").memory.num_tokens()
    remember(model, "s", "written by another process " * 8, root=tmp_path)  # e.g. `longmem remember` meanwhile
    assert sessions.get("s").memory.num_tokens() > before
