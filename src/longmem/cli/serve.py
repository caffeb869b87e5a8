"""``longmem serve``: the HTTP service."""

from __future__ import annotations

import argparse
from pathlib import Path

from longmem.cli.common import load_model, memory_dir_arg, model_args, positive_args


def add_parsers(sub) -> None:
    serve = sub.add_parser("serve", help="HTTP service: sessions with their own memories, streamed generation")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    serve.add_argument("--token", help="bearer token clients must send (default: $LONGMEM_TOKEN; it sees every "
                                       "session); a token or --keys is required to bind anything but loopback")
    serve.add_argument("--keys", type=Path, help="keys file of tenants, each key seeing only its own sessions "
                                                 "(make keys with: longmem keys add FILE NAME --sessions PATTERNS)")
    serve.add_argument("--max-request-bytes", type=int, default=8 << 20, help="largest request body (default 8 MiB)")
    serve.add_argument("--max-sessions", type=int, default=32, help="most sessions kept loaded in RAM (default 32; "
                                                                    "the least recently used are unloaded)")
    serve.add_argument("--memory-size", type=int, help="capacity of new sessions' memories in tokens (default 65536)")
    serve.add_argument("--segment", type=int, help="segment length T in tokens (default 1024)")
    memory_dir_arg(serve)
    model_args(serve)
    serve.set_defaults(func=cmd_serve)

    keys = sub.add_parser("keys", help="API keys of the HTTP service's tenants")
    verbs = keys.add_subparsers(title="verbs")
    keys.set_defaults(func=lambda args: keys.print_help() or 2)
    add = verbs.add_parser("add", help="make a key for a tenant; prints the key once (only its hash is stored)")
    add.add_argument("file", type=Path, help="the keys file (created if missing)")
    add.add_argument("name", help="the tenant's name")
    add.add_argument("--sessions", required=True,
                     help="comma-separated session name patterns the key may see, e.g. 'alice-*,shared'")
    add.set_defaults(func=cmd_keys_add)


def cmd_keys_add(args: argparse.Namespace) -> int:
    from longmem.serve.keys import add_key

    print(add_key(args.file, args.name, [p.strip() for p in args.sessions.split(",") if p.strip()]))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from longmem.serve.app import ServeConfig, serve

    config = ServeConfig(host=args.host, port=args.port, token=args.token, memory_dir=args.memory_dir,
                         max_request_bytes=args.max_request_bytes, keys=args.keys, max_sessions=args.max_sessions)
    config.check()  # refuse a bad address or token before loading a model
    positive_args(args, "memory_size", "segment")
    serve(load_model(args, memory_size=args.memory_size, segment_length=args.segment), config)
    return 0

