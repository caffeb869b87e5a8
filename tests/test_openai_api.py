"""The OpenAI-compatible endpoints, spoken to by the real ``openai`` client over HTTP on loopback."""

import json
import urllib.error
import urllib.request

import openai
import pytest
import torch

from longmem.inference.chat import chat_ids, exchange_text
from longmem.inference.generate import GenerationConfig, generate
from longmem.inference.session import Session
from test_serve import BOOK, Running

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")  # the tiny byte tokenizer's chat format
MODEL = "longmem-tiny-llama"


@pytest.fixture
def server(tmp_path):
    running = Running(tmp_path, token="sekrit")
    running.model.tokenizer.chat_template = TEMPLATE
    running.root = tmp_path
    yield running
    running.stop()


def client(server, key="sekrit"):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=120)


def greedy(model, prompt, memory=None, tokens=8):
    return generate(model, prompt, memory, GenerationConfig(max_new_tokens=tokens))


def test_models_and_completions_match_the_library(server):
    api = client(server)
    assert [m.id for m in api.models.list().data] == [MODEL]
    assert api.models.retrieve(MODEL).id == MODEL
    done = api.completions.create(model=MODEL, prompt="It is a truth", max_tokens=8, temperature=0)
    want = greedy(server.model, "It is a truth")
    assert done.object == "text_completion" and done.choices[0].text == want.text
    assert done.choices[0].finish_reason == ("length" if want.tokens == 8 else "stop")
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (want.prompt_tokens, want.tokens)
    assert done.usage.total_tokens == want.prompt_tokens + want.tokens
    chunks = list(api.completions.create(model=MODEL, prompt="It is a truth", max_tokens=8, temperature=0,
                                         stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == done.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_chat_goes_through_the_chat_template_and_streams(server):
    api = client(server)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    ids = chat_ids(server.model.tokenizer, messages)
    assert server.model.tokenizer.decode(ids) == "<system>Be brief.</s><user>Hello there</s><assistant>"
    want = greedy(server.model, torch.tensor(ids), tokens=6)
    done = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
    assert done.object == "chat.completion" and done.choices[0].message.role == "assistant"
    assert done.choices[0].message.content == want.text and done.usage.prompt_tokens == len(ids)
    chunks = list(api.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=6, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == want.tokens
    sampled = [api.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0.9,
                                           seed=7).choices[0].message.content for _ in range(2)]
    assert sampled[0] == sampled[1]  # a seed reproduces


def test_a_session_memory_is_read_and_a_conversation_is_kept(server):
    server.call("POST", "/v1/sessions", {"name": "book"})
    server.call("POST", "/v1/sessions/book/memory", {"text": BOOK})
    api = client(server)
    with_memory = api.completions.create(model=MODEL, prompt="It is", max_tokens=8, temperature=0,
                                         extra_body={"memory": "book"}).choices[0].text
    session = Session(server.model, "book", server.root, create=False)
    assert with_memory == greedy(server.model, "It is", session.memory).text
    assert with_memory != api.completions.create(model=MODEL, prompt="It is", max_tokens=8,
                                                 temperature=0).choices[0].text  # the memory changes the answer
    before = server.call("GET", "/v1/sessions/book")[1]["tokens_read"]
    messages = [{"role": "user", "content": "My name is Ann."}]
    reply = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0,
                                        extra_body={"memory": "book", "remember": True})
    kept = exchange_text(server.model.tokenizer, messages, reply.choices[0].message.content)
    after = server.call("GET", "/v1/sessions/book")[1]
    assert after["tokens_read"] == before + len(server.model.tokenizer(kept)["input_ids"])
    assert after["generations"] == 2  # the two requests that read this session
    streamed = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0, stream=True,
                                           extra_body={"memory": "book", "remember": True})
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    kept = exchange_text(server.model.tokenizer, messages, text)
    again = server.call("GET", "/v1/sessions/book")[1]["tokens_read"]
    assert again == after["tokens_read"] + len(server.model.tokenizer(kept)["input_ids"])  # kept once streamed too


def test_errors_have_openai_shape(server):
    api = client(server)
    with pytest.raises(openai.NotFoundError) as err:
        api.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    assert err.value.code == "model_not_found" and "longmem-tiny-llama" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        api.completions.create(model=MODEL, prompt="x", max_tokens=2, n=2)
    assert err.value.param == "n"
    with pytest.raises(openai.BadRequestError) as err:
        api.chat.completions.create(model=MODEL, messages=[{"role": "wizard", "content": "x"}])
    assert "role" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=10**6)
    assert err.value.param == "max_tokens" and "limit" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        api.completions.create(model=MODEL, prompt="x", extra_body={"remember": True})
    assert err.value.param == "remember"
    with pytest.raises(openai.NotFoundError) as err:
        api.completions.create(model=MODEL, prompt="x", max_tokens=2, extra_body={"memory": "nobody"})
    assert err.value.code == "session_not_found"
    with pytest.raises(openai.AuthenticationError):
        client(server, key="wrong").models.list()
    req = urllib.request.Request(server.url + "/v1/chat/completions", method="POST", data=b'{"model": 1}',
                                 headers={"authorization": "Bearer sekrit", "content-type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as raw:
        urllib.request.urlopen(req, timeout=60)
    body = json.loads(raw.value.read())
    assert raw.value.code == 400 and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error"
