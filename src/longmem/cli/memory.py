"""``longmem remember | memories | forget | generate``: named memories and generation with them."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from longmem.cli.common import load_model, memory_dir_arg, model_args, positive_args


def add_parsers(sub) -> None:
    remember = sub.add_parser("remember", help="read texts into a named memory kept on disk (append-only)")
    remember.add_argument("name", metavar="NAME", help="memory name (letters, digits, '.', '_', '-')")
    remember.add_argument("files", nargs="+", type=Path, metavar="FILE", help="UTF-8 text files")
    remember.add_argument("--memory-size", type=int, help="capacity of a new memory in tokens (default 65536)")
    remember.add_argument("--segment", type=int, help="segment length T in tokens (default 1024)")
    memory_dir_arg(remember)
    model_args(remember)
    remember.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    remember.set_defaults(func=cmd_remember)

    memories = sub.add_parser("memories", help="list named memories: sizes, token counts, backbone")
    memory_dir_arg(memories)
    memories.add_argument("--json", action="store_true", help="print a JSON list on stdout")
    memories.set_defaults(func=cmd_memories)

    forget = sub.add_parser("forget", help="delete a named memory, or (--source) one text remembered in it")
    forget.add_argument("name", metavar="NAME")
    forget.add_argument("--source", help="remove only the text(s) read from this source (`remember` names a text by "
                                         "its file name)")
    memory_dir_arg(forget)
    forget.add_argument("--segment", type=int, help="segment length T in tokens (default 1024)")
    model_args(forget)
    forget.set_defaults(func=cmd_forget)

    gen = sub.add_parser("generate", help="stream text generated after a prompt, with a named memory")
    gen.add_argument("prompt", help="the prompt text")
    gen.add_argument("--memory", metavar="NAME", help="named memory to read (default: none, empty memory)")
    memory_dir_arg(gen)
    gen.add_argument("--max-tokens", type=int, default=128, help="most tokens to generate (default 128)")
    gen.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0 = greedy)")
    gen.add_argument("--greedy", action="store_true", help="always the most likely token (temperature 0)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    gen.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    gen.add_argument("--seed", type=int, help="sampler seed")
    gen.add_argument("--window", type=int, help="local window in tokens (default: the segment length)")
    gen.add_argument("--segment", type=int, help="segment length T in tokens (default 1024)")
    model_args(gen)
    gen.add_argument("--json", action="store_true", help="print one JSON object at the end instead of streaming")
    gen.add_argument("--explain", action="store_true", help="per generated token, the memory entries it drew on: "
                                                           "the copied or most-attended text's source and characters")
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="interactive chat through the model's chat template; every finished "
                                       "exchange goes into the memory (slash commands: /stats /save NAME /forget "
                                       "/quit)")
    chat.add_argument("--memory", metavar="NAME", help="named memory the conversation reads and grows (created if "
                                                       "missing; default: a memory in RAM)")
    memory_dir_arg(chat)
    chat.add_argument("--system", help="system message")
    chat.add_argument("--max-tokens", type=int, default=256, help="most tokens per answer (default 256)")
    chat.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0 = greedy)")
    chat.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    chat.add_argument("--seed", type=int, help="sampler seed")
    chat.add_argument("--segment", type=int, help="segment length T in tokens (default 1024)")
    model_args(chat)
    chat.set_defaults(func=cmd_chat)


def cmd_remember(args: argparse.Namespace) -> int:
    from longmem.files import read_text
    from longmem.memory.io.named import check_name
    from longmem.inference.session import remember

    check_name(args.name)
    texts = [(path, read_text(path)) for path in args.files]  # validate every file before loading a model
    positive_args(args, "memory_size", "segment")
    model = load_model(args, segment_length=args.segment)
    results = []
    for path, text in texts:
        res = remember(model, args.name, text, source=path.name, root=args.memory_dir,
                       capacity_tokens=args.memory_size)
        results.append(res.to_dict())
        if not args.json:
            print(f"{args.name}: read {res.tokens} tokens of {path} ({res.tokens_per_s:.0f} tok/s); "
                  f"memory holds {res.memory.tokens} tokens")
    if args.json:
        print(json.dumps({"name": args.name, "results": results}))
    return 0


def cmd_memories(args: argparse.Namespace) -> int:
    from longmem.inference.session import list_memories

    rows = [m.to_dict() for m in list_memories(args.memory_dir)]
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'name':<24} {'tokens':>10} {'read':>10} {'capacity':>10} {'MB':>8}  backbone")
    for m in rows:
        print(f"{m['name']:<24} {m['tokens']:>10} {m['tokens_read']:>10} {m['capacity_tokens']:>10} "
              f"{m['bytes'] / 1e6:>8.1f}  {m['backbone']}")
    return 0


def cmd_forget(args: argparse.Namespace) -> int:
    from longmem.inference.session import forget, forget_source

    if args.source is None:
        forget(args.name, args.memory_dir)
        print(f"forgot {args.name}")
        return 0
    from longmem.memory.io.named import check_name

    check_name(args.name)
    positive_args(args, "segment")
    info = forget_source(load_model(args, segment_length=args.segment), args.name, args.source, args.memory_dir)
    print(f"forgot {args.source!r} in {args.name}: {info.tokens} tokens held, {info.tokens_read} read")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from longmem.inference.generate import GenerationConfig, stream
    from longmem.inference.session import load_named

    config = GenerationConfig(max_new_tokens=args.max_tokens, temperature=0.0 if args.greedy else args.temperature,
                              top_p=args.top_p, stop=args.stop, seed=args.seed, window=args.window,
                              explain=args.explain)
    if args.memory:
        from longmem.memory.io.named import check_name

        check_name(args.memory)
    positive_args(args, "segment")
    model = load_model(args, segment_length=args.segment)
    memory = load_named(model, args.memory, args.memory_dir)[0] if args.memory else None
    pieces = stream(model, args.prompt, memory, config)
    for piece in pieces:
        if not args.json:
            sys.stdout.write(piece)
            sys.stdout.flush()
    result = pieces.result
    if args.explain and args.memory:
        from longmem.inference.session import memory_root, with_sources
        from longmem.memory.io.named import NamedMemory

        with_sources(result.provenance, NamedMemory(memory_root(args.memory_dir) / args.memory))
    if args.json:
        print(json.dumps(result.to_dict() | {"memory": args.memory}))
    else:
        sys.stdout.write("\n")
        for entry in result.provenance or []:
            print(_explained(entry))
        print(f"[{result.tokens} tokens, {result.tokens_per_s:.1f} tok/s, stop: {result.finish_reason}]",
              file=sys.stderr)
    return 0



CHAT_HELP = "/stats  where the conversation stands | /save NAME  keep it in a named memory | " \
            "/forget  start over (empties the memory) | /quit"


def cmd_chat(args: argparse.Namespace) -> int:
    from longmem.inference.conversation import Conversation
    from longmem.inference.generate import GenerationConfig

    config = GenerationConfig(max_new_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                              seed=args.seed)
    if args.memory:
        from longmem.memory.io.named import check_name

        check_name(args.memory)
    positive_args(args, "segment")
    talk = Conversation(load_model(args, segment_length=args.segment), args.memory, args.memory_dir, args.system)
    tty = sys.stdin.isatty()
    print(f"longmem chat ({'memory ' + args.memory if args.memory else 'memory in RAM'}); {CHAT_HELP}",
          file=sys.stderr)
    while True:
        if tty:
            sys.stderr.write("you> ")
            sys.stderr.flush()
        line = sys.stdin.readline()
        if not line:
            return 0
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            verb, _, rest = text.partition(" ")
            if verb in ("/quit", "/exit"):
                return 0
            if verb == "/stats":
                print(json.dumps(talk.stats().to_dict()))
            elif verb == "/save" and rest.strip():
                talk.save(rest.strip())
                print(f"saved to memory {rest.strip()!r}", file=sys.stderr)
            elif verb == "/forget":
                talk.forget()
                print("forgotten: an empty memory, no messages", file=sys.stderr)
            else:
                print(CHAT_HELP, file=sys.stderr)
            continue
        pieces = talk.say(text, config)
        answer = []
        for piece in pieces:
            answer.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        talk.done("".join(answer))


def _explained(entry: dict) -> str:
    """One provenance entry as a line: the token, what it copied, what the memory attention weighed most."""
    def where(part: dict | None, what: str) -> str:
        if not part:
            return f"{what}: -"
        origin = part.get("from") or {}
        place = (f"{origin['source']}[{origin['start']}:{origin['end']}]" if "start" in origin
                 else origin.get("source", f"position {part['position']}"))
        return f"{what}: {place} ({part.get('share', part.get('weight', 0.0)):.2f})"

    return f"{entry['text']!r:>12}  {where(entry['copied'], 'copied')}  {where(entry['attended'], 'attended')}"
