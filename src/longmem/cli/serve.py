"""``longmem serve``: the HTTP service."""

from __future__ import annotations

import argparse

from longmem.cli.common import load_model, memory_dir_arg, model_args, positive_args


def add_parsers(sub) -> None:
    serve = sub.add_parser("serve", help="HTTP service: sessions with their own memories, streamed generation")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    serve.add_argument("--token", help="bearer token clients must send (default: $LONGMEM_TOKEN); "
                                       "required to bind anything but loopback")
    serve.add_argument("--max-request-bytes", type=int, default=8 << 20, help="largest request body (default 8 MiB)")
    serve.add_argument("--memory-size", type=int, help="capacity of new sessions' memories in tokens (default 65536)")
    serve.add_argument("--segment", type=int, help="segment length T in tokens (default 1024)")
    memory_dir_arg(serve)
    model_args(serve)
    serve.set_defaults(func=cmd_serve)



def cmd_serve(args: argparse.Namespace) -> int:
    from longmem.serve.app import ServeConfig, serve

    config = ServeConfig(host=args.host, port=args.port, token=args.token, memory_dir=args.memory_dir,
                         max_request_bytes=args.max_request_bytes)
    config.check()  # refuse a bad address or token before loading a model
    positive_args(args, "memory_size", "segment")
    serve(load_model(args, memory_size=args.memory_size, segment_length=args.segment), config)
    return 0

