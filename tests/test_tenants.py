"""Keys per tenant on the HTTP service: no key reads or changes another tenant's sessions."""

import hmac

import openai
import pytest

from conftest import run_cli
from longmem.errors import LongMemError
from longmem.serve.keys import Keys, add_key
from test_serve import BOOK, Running

MODEL = "longmem-tiny-llama"


@pytest.fixture
def tenants(tmp_path):
    keys = tmp_path / "keys.json"
    alice = add_key(keys, "alice", ["alice-*"])
    bob = add_key(keys, "bob", ["bob-*", "shared"])
    running = Running(tmp_path / "memories", token="admin-token", keys=keys)
    yield running, alice, bob
    running.stop()


def test_a_key_sees_only_its_own_sessions(tenants):
    server, alice, bob = tenants
    assert server.call("POST", "/v1/sessions", {"name": "alice-notes"}, token=alice)[0] == 201
    assert server.call("POST", "/v1/sessions", {"name": "bob-notes"}, token=bob)[0] == 201
    assert server.call("POST", "/v1/sessions", {"name": "shared"}, token=bob)[0] == 201
    status, body = server.call("POST", "/v1/sessions", {"name": "bob-2"}, token=alice)
    assert status == 403 and "may not create" in body["error"]
    assert server.call("POST", "/v1/sessions/alice-notes/memory", {"text": BOOK}, token=alice)[0] == 200
    listed = {s["name"] for s in server.call("GET", "/v1/sessions", token=alice)[1]["sessions"]}
    assert listed == {"alice-notes"}
    assert {s["name"] for s in server.call("GET", "/v1/sessions", token=bob)[1]["sessions"]} == {"bob-notes", "shared"}
    assert {s["name"] for s in server.call("GET", "/v1/sessions")[1]["sessions"]} == {  # the admin token: all
        "alice-notes", "bob-notes", "shared"}
    for method, path, body in (("GET", "/v1/sessions/alice-notes", None),
                               ("POST", "/v1/sessions/alice-notes/memory", {"text": "bob was here"}),
                               ("POST", "/v1/sessions/alice-notes/generate", {"prompt": "x", "max_tokens": 2}),
                               ("DELETE", "/v1/sessions/alice-notes", None)):
        status, answer = server.call(method, path, body, token=bob)
        assert status == 404 and "no session" in answer["error"], (method, path)  # as if it did not exist
    assert server.call("GET", "/v1/sessions/alice-notes", token=alice)[1]["tokens_read"] == len(BOOK)  # untouched
    api = openai.OpenAI(base_url=server.url + "/v1", api_key=bob, max_retries=0)
    with pytest.raises(openai.NotFoundError) as err:
        api.completions.create(model=MODEL, prompt="x", max_tokens=2, extra_body={"memory": "alice-notes"})
    assert err.value.code == "session_not_found"
    assert api.completions.create(model=MODEL, prompt="x", max_tokens=2, extra_body={"memory": "shared"}).usage
    for key in ("wrong", alice + "x", ""):
        assert server.call("GET", "/v1/sessions", token=key or "nothing")[0] == 401


def test_keys_are_hashed_and_compared_in_constant_time(tmp_path, monkeypatch, capsys):
    keys = tmp_path / "keys.json"
    code, out, _ = run_cli(capsys, "keys", "add", keys, "carol", "--sessions", "carol-*, shared")
    key = out.strip()
    assert code == 0 and key.startswith("lmk-") and key not in keys.read_text()  # only the digest is stored
    add_key(keys, "dave", ["dave-*"])
    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    tenant = Keys.load(keys).tenant(key)
    assert tenant.name == "carol" and tenant.sessions == ("carol-*", "shared") and len(calls) == 2
    calls.clear()
    assert Keys.load(keys).tenant("nope") is None and len(calls) == 2  # every entry, whatever matches
    bad = tmp_path / "bad.json"
    bad.write_text('{"keys": [{"name": "x", "sha256": "short", "sessions": ["*"]}]}')
    with pytest.raises(LongMemError, match="sha256 must be 64"):
        Keys.load(bad)
    code, _, err = run_cli(capsys, "serve", "--keys", bad, "--port", 0)
    assert code == 2 and "sha256" in err
