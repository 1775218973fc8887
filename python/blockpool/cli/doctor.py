"""``blockpool doctor``: versions, devices, which backend the block ops use on each, and a self-check of them.

With ``--model PATH``, also how blockpool stores that model's cache: one
line per cache entry (its kind, what a block holds and its bytes), how the
entries make up the model's layers, whether it batches, and whether its
attention reads the blocks in place (paged) or gathers them, with the
reason; or why the model is refused (exit status 1).
"""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

HELP = (
    "print versions, devices, the block ops' backend per device, and check each op against its reference; "
    "with --model, how a model's cache is stored"
)


def add_arguments(parser: Any) -> None:
    """``blockpool doctor [--model PATH]``."""
    parser.add_argument("--model", help="a model directory (or Hugging Face repo id): say how its cache is stored")


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def report() -> list[tuple[str, str]]:
    """The facts ``blockpool doctor`` prints, as (label, value) rows.

    Raises:
        InvalidRequestError: ``BLOCKPOOL_OPS`` holds an unknown value.
    """
    import mlx.core as mx

    from blockpool import _ext, ops

    devices = [mx.Device(mx.cpu)]
    gpu = "none"
    if mx.metal.is_available():
        gpu = "Metal"
    elif mx.cuda.is_available():
        gpu = "CUDA"
    if gpu != "none":
        devices.append(mx.Device(mx.gpu))
    metallib = Path(_ext.__file__).parent / "blockpool.metallib"
    rows = [
        ("python", platform.python_version()),
        ("mlx", _version("mlx")),
        ("mlx-lm", _version("mlx-lm")),
        ("blockpool", _version("mlx-blockpool")),
        ("platform", f"{platform.system()} {platform.machine()}"),
        ("default device", str(mx.default_device())),
        ("GPU backend of mlx", gpu),
        ("Metal kernels in this build", _ext.metal_build_status),
        ("metallib", str(metallib) if metallib.exists() else "absent"),
        ("BLOCKPOOL_OPS", os.environ.get(ops.ENV_VAR) or "unset (auto)"),
        ("CPU copy threads", str(_ext.num_copy_threads())),
    ]
    for device in devices:
        per_op = {op: ops.backend(device, op) for op in ops.OPS}
        summary = ops.backend(device)
        detail = (
            "" if len(set(per_op.values())) == 1 else " (" + ", ".join(f"{k}: {v}" for k, v in per_op.items()) + ")"
        )
        rows.append((f"block ops on {device}", summary + detail))
        checked = ops.verify(device)
        failed = {op: why for op, why in checked.items() if why != "ok"}
        verdict = (
            f"all {len(checked)} ops equal the reference"
            if not failed
            else "; ".join(f"{k}: {v}" for k, v in failed.items())
        )
        rows.append((f"self-check on {device}", verdict))
    return rows


def run(args: Any) -> int:
    """Print one ``label: value`` line per fact."""
    from blockpool.cli import UsageError
    from blockpool.errors import InvalidRequestError

    try:
        rows = report()
    except InvalidRequestError as e:
        raise UsageError(str(e)) from None
    status = 0
    if getattr(args, "model", None):
        model_rows, status = model_report(args.model)
        rows += model_rows
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    return status


def model_report(model_ref: str) -> tuple[list[tuple[str, str]], int]:
    """How a model's cache is stored, as (label, value) rows, and the exit status (1: refused).

    Raises:
        UsageError: The model cannot be found or loaded.
    """
    from blockpool import BlockPool, BlockPoolBatchEngine, ModelCacheSpec
    from blockpool.cli import load_model
    from blockpool.errors import UnsupportedModelError

    model, tokenizer = load_model(model_ref)
    try:
        spec = ModelCacheSpec.from_model(model)
    except UnsupportedModelError as e:
        return [("model", model_ref), ("refused", str(e))], 1
    rows = [("model", model_ref), ("model layers", f"{spec.model_layers}, as {spec.num_layers} cache entries")]
    for i in range(spec.num_layers):
        rows.append((f"entry {i}", describe_layer(spec, i)))
    for layer_id in spec.cache_lists:
        rows.append((f"layer {layer_id}", f"a CacheList of entries {', '.join(map(str, spec.groups[layer_id]))}"))
    engine = BlockPoolBatchEngine(model, tokenizer, BlockPool(spec, memory_bytes=1 << 30))
    batching = engine.batching
    if batching.decode and batching.padded_prefill:
        verdict = "exact: requests prefill and decode together"
    elif batching.decode:
        verdict = f"decode together, prefill one at a time ({batching.detail})"
    else:
        verdict = f"one sequence at a time ({batching.detail})"
    rows.append(("batching", verdict))
    paged = engine.paged
    if paged.paged:
        attention = f"paged: entries {', '.join(map(str, paged.layers))} attend over their blocks in place"
    else:
        attention = f"gathered into caches per pass ({paged.detail})"
    rows.append(("attention", attention))
    if spec.state_layers:
        rows.append(
            ("recurrent checkpoints", f"every {engine.checkpoint_blocks} blocks while prefilling, and at prompt ends")
        )
    return rows, 0


def describe_layer(spec: Any, layer_id: int) -> str:
    """One cache entry: its kind, what it keeps, what one of its blocks holds, and the block's bytes."""
    layer = spec.layers[layer_id]
    kind, g = layer.kind, layer.geometry
    if kind.storage == "state":
        what = ", ".join(f"{n} {tuple(shape)} {dtype}" for n, (shape, dtype) in g.planes().items())
    else:
        what = f"K {g.kv_heads}x{g.k_head_dim} and V {g.kv_heads}x{g.v_head_dim} {g.dtype} per token"
    return f"{kind.label}: keeps {kind.keeps()}; a block holds {what} ({spec.bytes_per_block(layer_id)} bytes)"
