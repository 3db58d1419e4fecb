"""``dualtoken serve``: the tokenization service and its web page, on uvicorn (loopback by default)."""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..config import apply_overrides, load_config_file
from ..errors import ConfigError
from ..registry import DEFAULT_MLLM, list_mllms
from .options import COUNT, PORT, add_model_options, add_precision_option, load_model, use_precision

if TYPE_CHECKING:
    from ..serving import ServeConfig
    from ..tokenizer import DualTokenizer


def serve_config(args: argparse.Namespace) -> ServeConfig:
    """ServeConfig from --config (JSON), then --set overrides, then the explicit flags."""
    # the serving package (FastAPI, uvicorn) loads only when `serve` runs, not for every command
    from ..serving import ServeConfig

    config = ServeConfig()
    if args.config:
        config = load_config_file(ServeConfig, args.config, "--config file (a JSON object of ServeConfig fields)")
    flags = {
        "host": args.host,
        "port": args.port,
        "max_batch": args.max_batch,
        "max_wait_ms": args.max_wait_ms,
        "max_queue": args.max_queue,
        "torch_threads": args.threads,
    }
    explicit = [f"{key}={json.dumps(value)}" for key, value in flags.items() if value is not None]
    return apply_overrides(config, [*args.set, *explicit])


def api_key(args: argparse.Namespace) -> str | None:
    """The API key from --api-key, else from $DUALTOKEN_API_KEY (the flag wins), else None; ConfigError for an empty
    key or one that cannot travel in a header (the message names where it came from, never the key)."""
    from ..serving.auth import ENV_VAR, check_api_key

    if args.api_key is not None:
        key, source = args.api_key, "--api-key"
    elif ENV_VAR in os.environ:
        key, source = os.environ[ENV_VAR], f"${ENV_VAR}"
    else:
        return None
    check_api_key(key, source)
    return key


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def access_note(host: str, key: str | None) -> str | None:
    """The note for a bind reachable from other machines (None on loopback): whether the API asks for a key."""
    if _is_loopback(host):
        return None
    access = "the API requires the API key" if key else "the API has no authentication (see --api-key)"
    return f"note: listening on {host}, reachable from other machines; {access}"


def check_port_free(host: str, port: int) -> None:
    """ConfigError when ``host:port`` cannot be bound (in use, or not an address of this machine)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no conflict
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}; choose another --port") from None


def served_models(tokenizer: DualTokenizer, mllm: str | None) -> str:
    """The banner's name of what is served: the tokenizer's name, its base model and where it was loaded from (a
    folder's name alone, such as an MLLM's ``tokenizer``, says little), then the MLLM's folder."""
    config = tokenizer.config
    details = [f"base model {config.base_model}"] if config.base_model else []
    if tokenizer.name_or_path is None:
        details.append("random weights")
    elif tokenizer.name_or_path != config.name:
        details.append(f"loaded from {tokenizer.name_or_path}")
    text = f"model {config.name}" + (f" ({', '.join(details)})" if details else "")
    if mllm is None:
        return text
    return text + (f" with the MLLM {mllm}" if mllm in list_mllms() else f" with the MLLM in {Path(mllm).resolve()}")


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from ..serving import create_app
    from ..serving.mllm import load_mllm

    config = serve_config(args)
    key = api_key(args)
    check_port_free(config.host, config.port)
    use_precision(args)
    if config.torch_threads is not None:
        torch.set_num_threads(config.torch_threads)
    tokenizer = load_model(args.model, args.random_weights)
    mllm = None if args.no_mllm else load_mllm(args.mllm)
    app = create_app(tokenizer, mllm=mllm, config=config, api_key=key)
    note = access_note(config.host, key)
    if note:
        print(note, file=sys.stderr)
    print(
        f"dualtoken serve: {served_models(tokenizer, None if args.no_mllm else args.mllm)} on http://{config.host}:{config.port}/ (API reference at /docs, OpenAPI document at /openapi.json)",
        flush=True,  # before uvicorn's log lines, when stdout is a pipe
    )
    if key:
        print("dualtoken serve: the API requires an API key (Authorization: Bearer <key>); the page asks for it")
    uvicorn.run(app, host=config.host, port=config.port, log_level=args.log_level)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="HTTP tokenization service + web page (loopback by default)")
    add_model_options(p)
    add_precision_option(p)
    p.add_argument(
        "--mllm", default=DEFAULT_MLLM,
        help=f"the MLLM behind /v1/chat and /v1/generate and the page's ask / draw panel: an embedded name or a "
        f"folder (default: {DEFAULT_MLLM})",
    )
    p.add_argument("--no-mllm", action="store_true", help="serve the tokenizer alone (no chat, no drawing)")
    p.add_argument("--host", default=None, help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=PORT, default=None, help="port (default: 8000)")
    p.add_argument(
        "--max-batch", type=COUNT, default=None, help="micro-batch size; 1 turns batching off (default: 8)"
    )
    p.add_argument(
        "--max-wait-ms", type=float, default=None, help="how long a batch waits to fill (default: 5)"
    )
    p.add_argument(
        "--max-queue", type=COUNT, default=None, help="waiting requests per queue before 503 (default: 64)"
    )
    p.add_argument("--threads", type=COUNT, default=None, help="torch intra-op threads")
    p.add_argument(
        "--api-key",
        default=None,
        help="require this key (Authorization: Bearer KEY) on every API route; the page asks for it. Prefer "
        "$DUALTOKEN_API_KEY, which stays out of shell history and the process list; this flag wins over it",
    )
    p.add_argument("--config", default=None, help="JSON file of ServeConfig fields")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a ServeConfig field"
    )
    p.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"], help="uvicorn's log level"
    )
    p.set_defaults(func=cmd_serve)
