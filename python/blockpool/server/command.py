"""``blockpool serve``: an OpenAI- and Anthropic-compatible HTTP server with persistent agents.

Under ``mlx.launch`` (``mx.distributed.init()`` sees more than one rank)
the model is loaded tensor-parallel with mlx-lm's ``sharded_load``; rank 0
serves HTTP and the other ranks follow it (``distributed.py``).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from blockpool.cli import UsageError, writable_dir
from blockpool.server.flags import add_arguments, check_exposure, default_cache_dir, default_memory_mb

__all__ = ["HELP", "add_arguments", "run"]

HELP = "serve a model over OpenAI's and Anthropic's HTTP APIs, with agents that persist across turns and restarts"

log = logging.getLogger("blockpool.server")


def run(args: Any) -> int:
    """Load the model, build pool, engine and store, and serve until SIGTERM or Ctrl-C."""
    import mlx.core as mx

    group = mx.distributed.init()
    rank, size = group.rank(), group.size()
    prefix = f"[rank {rank}/{size}] " if size > 1 else ""
    logging.basicConfig(level=getattr(logging, args.log_level), format=f"%(asctime)s %(levelname)s {prefix}%(message)s")
    if rank == 0:
        check_exposure(args)
        _check_port_free(args.host, args.port)
    cache_root = writable_dir(args.cache_dir or default_cache_dir(), "cache directory")
    memory_mb = args.memory_mb or default_memory_mb()

    model, tokenizer = _load(args.model, size)
    memory, cache_dir = _build_store(model, tokenizer, args, memory_mb, cache_root, rank, size)
    from blockpool.server.distributed import Lockstep
    from blockpool.server.runner import EngineRunner

    lockstep = Lockstep(group)
    mx.random.seed(lockstep.agree_seed())  # the same global random state on every rank
    runner = EngineRunner(
        memory,
        lockstep=lockstep,
        max_requests=args.max_concurrency + args.queue_limit,
        anonymous_agents=args.anonymous_agents,
        max_agents=args.max_agents,
        max_disk_bytes=args.max_disk_mb << 20 if args.max_disk_mb else None,
    )
    pool = memory.pool
    log.info(
        "model %s; KV budget %d MiB (%d blocks of %d tokens%s); agents in %s",
        args.model,
        memory_mb,
        pool.total_blocks,
        pool.block_tokens,
        f", {args.kv_bits}-bit" if args.kv_bits else "",
        cache_dir,
    )
    if rank != 0:
        # Followers end when rank 0 tells them to (after its own drain), not on their own signals.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: log.info("signal received; waiting for rank 0 to stop"))
        runner.follow()
        failed = runner._failed is not None
        log.info("stopped; agents persisted" if not failed else "stopped after an error")
        _exit_now(1 if failed else 0)
    _exit_now(_serve_http(runner, args, rank, size))
    return 0  # not reached


def _serve_http(runner: Any, args: Any, rank: int, size: int) -> int:
    import uvicorn

    from blockpool.server.app import ServerState, create_app
    from blockpool.server.http_protocol import with_header_deadline
    from blockpool.server.schemas import Defaults
    from blockpool.server.state import context_length

    model_path = Path(args.model).expanduser()
    aliases = {model_path.name, str(model_path.resolve())} if model_path.exists() else set()
    state = ServerState(
        runner=runner,
        model_id=args.model,
        aliases=aliases,
        defaults=Defaults(args.max_tokens, args.temp, min(args.top_p, 1.0), args.top_k, min(args.min_p, 1.0)),
        chat_template_args=args.chat_template_args,
        max_prompt_tokens=args.max_prompt_tokens or context_length(_model_config(args.model)),
        api_key=args.api_key,
        body_timeout=args.body_timeout,
        rank=rank,
        world_size=size,
    )
    config = uvicorn.Config(
        create_app(state),
        host=args.host,
        port=args.port,
        log_config=None,
        log_level=args.log_level.lower(),
        access_log=False,
        timeout_graceful_shutdown=args.drain_timeout,
        lifespan="on",
        http=with_header_deadline(args.header_timeout),
        limit_concurrency=args.max_connections,
    )
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal that stopped it once it has shut down; by then
    # every agent is persisted, so a no-op handler lets the command exit 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    log.info(
        "serving on http://%s:%d (OpenAI: /v1/chat/completions, /v1/completions; Anthropic: /v1/messages)%s",
        args.host,
        args.port,
        "; API key required" if args.api_key else "",
    )
    features = state.features
    log.info(
        "tool calls: %s; reasoning: %s",
        "parsed" if features.tool_calls else "off (the tokenizer has no tool parser: calls come back as text)",
        "parsed" if features.reasoning else "off (no think markers in the vocabulary)",
    )
    server.run()
    if runner.alive:  # startup failed before the lifespan stopped it
        runner.stop()
    failed = runner._failed is not None or not server.started
    log.info("stopped; agents persisted" if not failed else "stopped after an error")
    return 1 if failed else 0


def _model_config(model_ref: str) -> dict[str, Any]:
    """The model's ``config.json`` (a local folder, or the Hugging Face cache ``load`` filled); {} if unreadable.

    Read for the context length: mlx-lm's ``ModelArgs`` of several families
    (llama among them) drop ``max_position_embeddings``.
    """
    try:
        local = Path(model_ref).expanduser()
        if not local.exists():
            from mlx_lm.utils import hf_repo_to_path

            local = Path(hf_repo_to_path(model_ref))
        config = json.loads((local / "config.json").read_text())
    except Exception:  # no file, no cache, not JSON: the limit falls back to the model's args
        return {}
    return config if isinstance(config, dict) else {}


def _exit_now(status: int) -> None:
    """End the process with ``status`` once everything is persisted, skipping interpreter teardown.

    MLX 0.32 (CPU) sometimes aborts at interpreter exit ("terminate called
    without an active exception", status -6) after MLX work ran on a thread
    other than the main one, as the engine thread's does. Every agent is on
    disk and the log is flushed by now, so nothing is lost by not tearing down.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _check_port_free(host: str, port: int) -> None:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UsageError(f"cannot listen on {host}: {e.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as e:
            raise UsageError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def _load(model_ref: str, size: int) -> tuple[Any, Any]:
    if size == 1:
        from blockpool.cli import load_model

        return load_model(model_ref)
    from mlx_lm.utils import sharded_load

    try:
        return sharded_load(model_ref)
    except Exception as e:  # loading failures come in many types: one line
        raise UsageError(f"cannot load model {model_ref!r} tensor-parallel: {e}") from None


def _build_store(
    model: Any, tokenizer: Any, args: Any, memory_mb: int, cache_root: Path, rank: int, size: int
) -> tuple[Any, Path]:
    import re

    from blockpool import AgentMemory, BlockPool, BlockPoolBatchEngine, ModelCacheSpec
    from blockpool.errors import BlockPoolError
    from blockpool.persistence import model_fingerprint

    try:
        spec = ModelCacheSpec.from_model(model)
        pool = BlockPool(spec, memory_bytes=memory_mb << 20, kv_bits=args.kv_bits)
        # The server bounds its own queue (--queue-limit, a 429 past it), so the engine's is unbounded.
        engine = BlockPoolBatchEngine(
            model,
            tokenizer,
            pool,
            completion_batch_size=args.max_concurrency,
            prefill_step_size=args.prefill_step_size,
            max_waiting=None,
        )
    except BlockPoolError as e:
        raise UsageError(str(e)) from None
    # Files of different models (and of each rank's shard) never mix: one folder each.
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(args.model).name or "model")[:48]
    folder = f"{name}-{model_fingerprint(model, spec)[:12]}"
    if size > 1:
        folder += f"-tp{size}-rank{rank}"
    cache_dir = writable_dir(cache_root / folder, "cache directory")
    # Durable: every finished turn is written behind. Deterministic under mlx.launch:
    # disk work is done in line, so every rank decides the same things at the same step.
    return AgentMemory(engine, cache_dir=cache_dir, durable=True, deterministic=size > 1), cache_dir
