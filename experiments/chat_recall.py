"""Conversation memory through the OpenAI chat endpoint: is a fact told 3 exchanges and > 4,000 tokens earlier
recalled once it has left the window?

Per fact (``--facts``, default 20), a fresh session on ``longmem serve`` (in this process, on loopback), spoken
to by the official ``openai`` client as a chat client that keeps its history on the server (``remember``:
every finished exchange is read into the session's memory) and sends only its newest message:

1. the user tells a fact ("By the way, my sister's name is Margot."), the assistant answers;
2. three exchanges in which the user pastes ~1,450 tokens of a held-out book (``data/heldout``, never
   trained on) and asks for a summary -- > 4,000 tokens in all, so the fact is out of the 1,024-token window;
3. the user asks ("What is my sister's name?"); right when the name is in the answer.

The same question without the session's memory (the model alone) is the baseline. Relations, names and
wordings are this script's own (not the training generator's, not the recall suite's).
    python experiments/chat_recall.py [--facts 20] [--sidenet default] [--out results/chat-recall.json]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai

from longmem import LongMemModel
from longmem.evals.results import git_commit
from longmem.serve.app import ServeConfig, make_server

RELATIONS = ["sister", "brother", "dog", "cat", "boss", "neighbour", "dentist", "landlord", "cousin", "parrot",
             "horse", "teacher", "grandmother", "coach", "accountant", "goldfish", "uncle", "aunt", "tortoise",
             "piano teacher"]
NAMES = ["Margot", "Tobias", "Biscuit", "Clementine", "Ravindra", "Ingrid", "Ptolemy", "Wilhelmina", "Casimir",
         "Juniper", "Bartholomew", "Odalys", "Fenwick", "Perpetua", "Lysander", "Marisol", "Quentin", "Seraphina",
         "Ambrose", "Theodora"]


def passages(path: Path, n: int, tokens: int, tokenizer, rng: random.Random) -> list[str]:
    """n passages of about ``tokens`` tokens from a held-out text."""
    text = path.read_text(encoding="utf-8")
    chars = tokens * 4
    out = []
    for _ in range(n):
        a = rng.randrange(0, len(text) - chars)
        piece = text[a : a + chars]
        ids = tokenizer(piece, add_special_tokens=False)["input_ids"][:tokens]
        out.append(tokenizer.decode(ids))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--facts", type=int, default=20)
    parser.add_argument("--sidenet", default="default")
    parser.add_argument("--filler-tokens", type=int, default=1450, help="tokens of book per filler exchange")
    parser.add_argument("--book", type=Path, default=Path("data/heldout/melville-moby-dick.txt"))
    parser.add_argument("--out", type=Path, default=Path("results/chat-recall.json"))
    parser.add_argument("--memory-dir", type=Path, default=Path("runs/chat-recall-memories"))
    args = parser.parse_args()
    model = LongMemModel.from_pretrained(args.sidenet)
    server = make_server(model, ServeConfig(port=0, memory_dir=args.memory_dir))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    api = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=3600)
    name = f"longmem-{model.config.backbone}"
    rng = random.Random(0)
    pairs = list(zip(RELATIONS, rng.sample(NAMES, len(NAMES))))
    rows, started = [], time.perf_counter()
    for i in range(args.facts):
        relation, person = pairs[i % len(pairs)]
        session = f"chat-recall-{i}"
        api_session = {"memory": session, "remember": True}
        for method in ("DELETE", "POST"):  # a fresh session
            body = None if method == "DELETE" else json.dumps({"name": session}).encode()
            path = f"/v1/sessions/{session}" if method == "DELETE" else "/v1/sessions"
            request = urllib.request.Request(server.url + path, data=body, method=method,
                                             headers={"content-type": "application/json"})
            try:
                urllib.request.urlopen(request, timeout=60).read()
            except urllib.error.HTTPError:
                pass

        def say(text: str, **extra) -> str:
            reply = api.chat.completions.create(model=name, messages=[{"role": "user", "content": text}],
                                                max_tokens=16, temperature=0, extra_body=extra)
            return reply.choices[0].message.content
        say(f"By the way, my {relation}'s name is {person}.", **api_session)
        told = 0
        for passage in passages(args.book, 3, args.filler_tokens, model.tokenizer, rng):
            say(f"Please summarise this passage in one sentence:\n\n{passage}", **api_session)
            told += args.filler_tokens
        question = f"What is my {relation}'s name?"
        with_memory = say(question, memory=session)
        alone = say(question)
        rows.append({"relation": relation, "name": person, "tokens_between": told, "answer": with_memory,
                     "answer_without_memory": alone, "right": person.lower() in with_memory.lower(),
                     "right_without_memory": person.lower() in alone.lower()})
        print(f"{i}: {relation} = {person}: {with_memory!r} ({rows[-1]['right']}); alone {alone!r}", flush=True)
    server.should_exit = True
    right = sum(r["right"] for r in rows)
    record = {"command": "python " + " ".join(sys.argv), "commit": git_commit(), "sidenet": args.sidenet,
              "facts": len(rows), "accuracy": right / len(rows),
              "accuracy_without_memory": sum(r["right_without_memory"] for r in rows) / len(rows),
              "seconds": time.perf_counter() - started, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: record[k] for k in ("facts", "accuracy", "accuracy_without_memory", "seconds")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
