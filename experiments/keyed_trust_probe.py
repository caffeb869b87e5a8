"""Why a keyed answer is missed: the copy head's trusts and the answer's probability, teacher-forced.

For recall prompts of one task, reads the prompt into memory, teacher-forces the ideal answer (": V." or, for
the list tasks, ": V4, V3, V2, V1." the latest statement first) and records at every answer token the exact
matches' trust lam_n, the keyed matches' trust lam_k, the keyed pointer's weight on the right token and the
model's probability of it. Prints the means at the tokens where a value starts and whether greedy decoding
would have continued the answer there.
    python experiments/keyed_trust_probe.py --task multikey --templates heldout --trials 5
"""

from __future__ import annotations

import argparse
import random

import torch

from longmem import LongMemModel
from longmem.evals.recall import PromptBuilder, RecallConfig, TaskMaker, answer_tokens
from longmem.evals.scoring import parse_mode, prepare, score, split_prefix


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sidenet", default="default")
    parser.add_argument("--task", default="multikey")
    parser.add_argument("--templates", default="ruler")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args()
    model = LongMemModel.from_pretrained(args.sidenet)
    head = model.sidenet.copy_head
    seen: dict[str, torch.Tensor] = {}

    def recording(name, method):
        def wrapped(*a, **k):
            out = method(*a, **k)
            seen[name] = out
            return out
        return wrapped

    head.exact = recording("exact", head.exact)
    head.keyed_source = recording("keyed", head.keyed_source)
    cfg = RecallConfig(templates=args.templates)
    builder, maker, mode = PromptBuilder(model.tokenizer, cfg), TaskMaker(cfg), parse_mode(model, "memory")
    space = model.tokenizer(" ", add_special_tokens=False)["input_ids"][-1]
    rows = []
    for t in range(args.trials):
        rng = random.Random(f"{cfg.seed}-{args.task}-{args.length}-{t}")
        prompt = builder.build(maker(args.task, rng), args.length, rng)
        values = prompt.task.expected[::-1]
        answer = torch.tensor(model.tokenizer(": " + ", ".join(values) + ".", add_special_tokens=False)["input_ids"])
        head_ids, local = split_prefix(prompt.ids, mode.window, answer_tokens(prompt.task, cfg.digits) + 4)
        ctx = prepare(model, mode, head_ids)
        s = score(model, ctx, local, answer)
        n = local.shape[0]
        _, _, lam_n = seen["exact"]
        ids_k, w_k, lam_k = seen["keyed"]
        comma = model.tokenizer(",", add_special_tokens=False)["input_ids"][-1]
        for i in range(1, answer.shape[0]):
            if int(answer[i - 1]) != space and int(answer[i]) != comma:
                continue  # a value starts after each " "; a comma ends one
            q = n - 1 + i  # the query position predicting answer[i] (window index)
            right = float((w_k[0, q] * (ids_k[0, q] == answer[i])).sum())
            rows.append((t, i, float(lam_n[0, q]), float(lam_k[0, q]), right, s.argmax[i] == int(answer[i])))
        print(f"trial {t}: values {values}; greedy keeps the answer at {sum(a == int(b) for a, b in zip(s.argmax, answer))}"
              f" / {answer.shape[0]} tokens")
        print("   answer:", [model.tokenizer.decode([int(x)]) for x in answer])
        print("   argmax:", [model.tokenizer.decode([x]) for x in s.argmax])
    for t, i, ln, lk, right, ok in rows:
        print(f"  trial {t} token {i}: lam_n {ln:.2f} lam_k {lk:.2f} keyed weight on the value {right:.2f} "
              f"argmax right {ok}")


if __name__ == "__main__":
    main()
