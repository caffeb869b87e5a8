"""``longmem chat`` and the Conversation behind it: the chat template, a memory growing with the exchanges."""

import io
import json

import pytest

from conftest import byte_tokenizer, run_cli, tiny_llama
from longmem.errors import LongMemError
from longmem.inference.chat import exchange_text
from longmem.inference.conversation import Conversation
from longmem.inference.generate import GenerationConfig
from longmem.inference.reader import tokenize
from longmem.inference.session import list_memories
from test_openai_api import TEMPLATE
from test_serve import perturbed


@pytest.fixture
def chat_model():
    model = perturbed()
    model.tokenizer.chat_template = TEMPLATE
    return model


def talk(conversation, text, tokens=4):
    answer = "".join(conversation.say(text, GenerationConfig(max_new_tokens=tokens)))
    conversation.done(answer)
    return answer


def test_every_exchange_enters_the_memory_and_old_ones_leave_the_prompt(chat_model, tmp_path):
    chat = Conversation(chat_model, root=tmp_path, budget=48)
    held = []
    for text in ("My name is Ann.", "I live by the sea.", "I keep bees.", "What is my name?"):
        before = chat.memory.end_position.item()
        answer = talk(chat, text)
        exchange = exchange_text(chat_model.tokenizer, chat.messages[:-1], answer)
        assert chat.memory.end_position.item() == before + tokenize(chat_model, exchange).shape[0]  # all of it
        held.append(chat.stats().prompt_messages)
    assert held[0] == 1 and held[-1] < 7  # the budget keeps only the newest messages in the prompt
    assert chat.stats().exchanges == 4 and chat.stats().memory_tokens > 0
    chat.save("kept")  # a RAM conversation into a named memory
    kept = {m.name: m for m in list_memories(tmp_path)}["kept"]
    assert kept.tokens_read == tokenize(chat_model, "".join(chat.transcript)).shape[0]  # every exchange
    named = Conversation(chat_model, "notes", tmp_path)
    talk(named, "Hello")
    again = Conversation(chat_model, "notes", tmp_path)  # reloaded from disk
    assert again.memory.num_tokens() == named.memory.num_tokens() and again.memory.end_position.item() > 0
    named.forget()
    assert named.memory.end_position.item() == 0 and named.stats().exchanges == 0


def test_a_backbone_without_a_chat_template_is_refused(tmp_path):
    model = perturbed()
    with pytest.raises(LongMemError, match="no chat template"):
        Conversation(model)


def test_the_chat_command(tmp_path, capsys, monkeypatch):
    backbone = tmp_path / "bb"
    tiny_llama().save_pretrained(backbone)
    tok = byte_tokenizer()
    tok.chat_template = TEMPLATE
    tok.save_pretrained(backbone)
    script = "Hello there\n/stats\n/save kept\nAnd again\n/stats\n/forget\n/stats\n/quit\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(script))
    code, out, err = run_cli(capsys, "chat", "--memory", "talk", "--memory-dir", tmp_path / "m", "--backbone",
                             backbone, "--dtype", "float32", "--max-tokens", 3, "--segment", 64)
    assert code == 0, err
    stats = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [s["exchanges"] for s in stats] == [1, 2, 0] and stats[0]["memory"] == "talk"
    assert stats[1]["memory_tokens"] >= stats[0]["memory_tokens"] and "saved to memory 'kept'" in err
    assert {m.name for m in list_memories(tmp_path / "m")} == {"talk", "kept"}
