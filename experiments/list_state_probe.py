"""Does the SideNet's state at a value's end tell a list answer from a one-value answer? A linear probe.

Lists fail (research log, Keyed recall) because, where an answer's first value ends, the exact matches copy
the statement's "." with trust 0.7-0.9 and only the copy head's context gates, which read the SideNet's final
state there, could tell that a list goes on. This builds prompts from the *training* generator's wording
(``train/facts.py``: keyed statements, their one-value questions and their list questions), over book text of
the training split, reads each in one window, and fits a logistic regression (70% / 30% split) on the final
state at the first value's last digit, on the mean of the last 16 states there, and on the state at the
answer's first token, to the label "list answer".
    python experiments/list_state_probe.py [--sidenet DIR] [--n 200]
"""

from __future__ import annotations

import argparse
import random

import torch

from longmem import LongMemModel
from longmem.train.facts import Fact, FactWords


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sidenet", default="default")
    parser.add_argument("--n", type=int, default=200, help="prompts per class")
    parser.add_argument("--book", default="data/books/train/austen-prideprejudice.txt")
    args = parser.parse_args()
    model = LongMemModel.from_pretrained(args.sidenet)
    model.eval()
    head = model.sidenet.copy_head
    seen = {}

    def exact(log, context, logp, hidden=None):
        seen["hidden"] = hidden
        return original(log, context, logp, hidden)

    original, head.exact = head.exact, exact
    words, tok = FactWords(model.tokenizer), model.tokenizer
    book = tok(open(args.book).read()[:400_000], add_special_tokens=False)["input_ids"]
    rng = random.Random(0)
    feats: dict[str, list] = {"value end": [], "mean of last 16": [], "answer start": []}
    labels = []
    for i in range(2 * args.n):
        listed = i % 2 == 1
        first = words.fact(rng, keyed=True, number=True)
        stated = [first]
        if listed:
            for _ in range(rng.randint(1, 3)):
                like = Fact(0, 0, [], [], first.subject, first.value, first.copula, first.form)
                stated.append(words.fact(rng, keyed=True, like=like))
        ids: list[int] = []
        for s in stated:
            a = rng.randrange(len(book) - 200)
            ids += book[a:a + rng.randint(40, 120)] + s.statement
        a = rng.randrange(len(book) - 200)
        ids += book[a:a + 80]
        if listed:
            facts = [Fact(0, k, [], [], s.subject, s.value, s.copula, s.form) for k, s in enumerate(stated)]
            question, answer = words.list_question(rng, facts)
            value = stated[-1].value  # the latest first
        else:
            question, answer, value = first.question, first.answer, first.value
        start = len(ids) + len(question)
        ids += question + answer
        digits = tok(value, add_special_tokens=False)["input_ids"]
        end = next(j for j in range(start, len(ids)) if ids[j - len(digits) + 1 : j + 1] == digits)
        x = torch.tensor(ids)[None]
        with torch.no_grad():
            model(x, memory=model.new_memory(batch_size=1))
        h = seen["hidden"][0].float()  # [T,D]
        feats["value end"].append(h[end])
        feats["mean of last 16"].append(h[end - 15 : end + 1].mean(0))
        feats["answer start"].append(h[start])
        labels.append(float(listed))
    y = torch.tensor(labels)
    cut = int(0.7 * len(y))
    for name, rows in feats.items():
        x = torch.stack(rows)
        x = (x - x[:cut].mean(0)) / (x[:cut].std(0) + 1e-6)
        w = torch.zeros(x.shape[1], requires_grad=True)
        b = torch.zeros(1, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=200)

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(x[:cut] @ w + b, y[:cut]) + 1e-2 * w.square().sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            acc = ((x[cut:] @ w + b > 0).float() == y[cut:]).float().mean()
            gate = (x[:, :] @ w + b)
        print(f"{name:16s} held-out accuracy {acc:.3f} (train {((gate[:cut] > 0).float() == y[:cut]).float().mean():.3f})")


if __name__ == "__main__":
    main()
