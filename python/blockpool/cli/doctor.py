"""``blockpool doctor``: versions, devices, which backend the block ops use on each, and a self-check of them."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

HELP = "print versions, devices, the block ops' backend per device, and check each op against its reference"


def add_arguments(parser: Any) -> None:
    """``blockpool doctor`` takes no arguments."""


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
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    return 0
