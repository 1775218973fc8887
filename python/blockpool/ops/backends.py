"""Which implementation runs each block op on a device, and the one call path every op takes.

``native`` is the compiled MLX primitives of ``blockpool._ext``; ``reference``
the pure-MLX :mod:`blockpool.reference`. The rules are in the docstring of
:mod:`blockpool.ops`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import mlx.core as mx

from blockpool import _ext
from blockpool.errors import InvalidRequestError
from blockpool.ops.self_check import ENV_VAR, Backend, self_check

StreamLike = mx.Stream | mx.Device | None
BlockIdList = Sequence[int] | mx.array

#: The ops this module dispatches, by name.
OPS: tuple[str, ...] = (
    "gather_blocks",
    "scatter_blocks",
    "gather_dequantize_blocks",
    "concat_blocks",
    "concat_dequantize_blocks",
    "split_blocks",
    "paged_attention",
    "write_tokens",
)

#: Whether this build has native GPU kernels (Metal) and a Metal GPU to run
#: them. False on Linux, on CUDA builds, and where the Metal build failed.
native_gpu_kernels: bool = bool(_ext.metal_kernels_built) and mx.metal.is_available()

_MODES = {"": "auto", "auto": "auto", "native": "native", "reference": "reference"}


def _mode() -> str:
    value = os.environ.get(ENV_VAR, "").strip().lower()
    try:
        return _MODES[value]
    except KeyError:
        raise InvalidRequestError(
            f"{ENV_VAR} must be 'reference', 'native', 'auto' or unset, got {os.environ[ENV_VAR]!r}"
        ) from None


def device_of(stream: StreamLike | mx.DeviceType) -> mx.Device:
    """The device a stream, device, device type or None (the default device) names."""
    if stream is None:
        return mx.default_device()
    if isinstance(stream, mx.Stream):
        return stream.device
    if isinstance(stream, mx.DeviceType):
        return mx.Device(stream)
    return stream


_lock = threading.Lock()
_self_checked: dict[tuple[str, str], Backend] = {}  # (op, str(device)): mx.Device hashes by identity


def _backend_of(op: str, device: mx.Device) -> Backend:
    mode = _mode()
    if mode == "reference":
        return "reference"
    if device.type == mx.cpu or mode == "native":
        return "native"
    if not native_gpu_kernels:
        return "reference"
    key = (op, str(device))
    found = _self_checked.get(key)
    if found is None:
        with _lock:
            found = _self_checked.get(key)
            if found is None:
                found = _self_checked[key] = self_check(op, device)
    return found


def backend(device: mx.Device | mx.DeviceType | None = None, op: str | None = None) -> Backend:
    """The implementation the block ops use on ``device`` (the default device when None).

    With ``op`` (one of :data:`OPS`), the backend of that op alone; without,
    ``"native"`` only when every op runs natively there. On a GPU this runs
    the self-checks that have not run yet in this process.

    Raises:
        InvalidRequestError: ``op`` is not one of :data:`OPS`, or
            ``BLOCKPOOL_OPS`` holds an unknown value.
    """
    if op is not None and op not in OPS:
        raise InvalidRequestError(f"op must be one of {', '.join(OPS)}; got {op!r}")
    dev = device_of(device)
    names = OPS if op is None else (op,)
    return "native" if all(_backend_of(name, dev) == "native" for name in names) else "reference"


def _native(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call a native op function; bad input becomes InvalidRequestError."""
    try:
        return fn(*args, **kwargs)
    except InvalidRequestError:
        raise
    except ValueError as e:
        raise InvalidRequestError(str(e)) from None


def run(
    op: str,
    stream: StreamLike,
    native_args: tuple,
    native_kwargs: dict,
    reference_call: Callable[[], Any],
    reference_only: bool = False,
) -> Any:
    """Run ``op`` natively or, where :func:`backend` says so (or ``reference_only``), through the reference,
    after the native op function has checked the arguments either way."""
    fn = getattr(_ext, op)
    if not reference_only and _backend_of(op, device_of(stream)) == "native":
        return _native(fn, *native_args, stream=stream, **native_kwargs)
    # The same checks and errors as the native path: the op function
    # validates and builds a CPU node that is dropped, never evaluated.
    _native(fn, *native_args, stream=mx.cpu, **native_kwargs)
    with mx.stream(stream) if stream is not None else nullcontext():
        return reference_call()
