"""Provenance: per generated token, the memory entries it drew on, down to the source's characters."""

import openai
import torch

from conftest import run_cli
from longmem.inference.generate import GenerationConfig
from longmem.inference.session import Session, remember, with_sources
from test_decode import trained
from test_serve import Running

KEY = "The pass key is 7 1 4 2 9. Remember it. "
TEXT = KEY * 2 + "Filler text goes here and there. " * 8


def explained(tmp_path, prompt="The pass key is 7 1", tokens=6):
    model = trained("llama", memory_size=512)
    remember(model, "x", TEXT, source="key.txt", root=tmp_path)
    session = Session(model, "x", tmp_path, create=False)
    pieces = session.stream(prompt, GenerationConfig(max_new_tokens=tokens, explain=True))
    text = "".join(pieces)
    return model, session, text, with_sources(pieces.result.provenance, session.store)


def test_copied_tokens_point_at_their_characters_in_the_source(tmp_path):
    model, session, text, provenance = explained(tmp_path)
    assert text == " 4 2 9" and len(provenance) == 6
    log, bank = session.memory.token_log, session.memory
    held = set(bank.row_positions(0).flatten().tolist()) | set(bank.recent.held_positions[0].tolist())
    for entry in provenance:
        copied = entry["copied"]
        assert copied is not None and copied["share"] > 0.5  # this text is copied, not made up
        assert int(log.lookup(torch.tensor([[copied["position"]]]))[0, 0]) == entry["token"]  # the token log agrees
        origin = copied["from"]
        assert origin["source"] == "key.txt" and TEXT[origin["start"]:origin["end"]] == entry["text"]
        attended = entry["attended"]
        assert attended is None or (attended["position"] in held and 0 < attended["weight"] <= 1)
    assert any(e["attended"] for e in provenance)
    plain = session.stream("The pass key is 7 1", GenerationConfig(max_new_tokens=6))
    assert "".join(plain) == text and plain.result.provenance is None  # explaining changes nothing


def test_explain_on_the_command_line_and_the_openai_endpoints(tmp_path, capsys, backbone_dir):
    (tmp_path / "key.txt").write_text(TEXT)
    common = ["--memory-dir", tmp_path / "m", "--backbone", backbone_dir, "--dtype", "float32", "--segment", 64]
    assert run_cli(capsys, "remember", "k", tmp_path / "key.txt", *common)[0] == 0
    code, out, _ = run_cli(capsys, "generate", "The pass key is 7 1", "--memory", "k", "--max-tokens", 3,
                           "--explain", *common)
    assert code == 0 and len([line for line in out.splitlines() if "copied:" in line]) == 3
    server = Running(tmp_path / "srv")
    try:
        server.call("POST", "/v1/sessions", {"name": "s"})
        server.call("POST", "/v1/sessions/s/memory", {"text": TEXT, "source": "key.txt"})
        api = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        done = api.completions.create(model="longmem-tiny-llama", prompt="The pass key is 7 1", max_tokens=4,
                                      temperature=0, extra_body={"memory": "s", "explain": True})
        provenance = done.model_extra["provenance"]
        assert len(provenance) == done.usage.completion_tokens
        sources = {e[k]["from"]["source"] for e in provenance for k in ("copied", "attended") if e[k] and e[k]["from"]}
        assert sources <= {"key.txt"} and sources
    finally:
        server.stop()
