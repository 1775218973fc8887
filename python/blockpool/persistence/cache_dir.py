"""A cache directory's housekeeping: interrupted saves, files set aside, and a read-only report of every entry.

Nothing here follows a symbolic link or opens anything that is not a
regular file, so a hostile entry (a link, a FIFO) is reported, never read.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from blockpool.errors import CacheCorruptionError, IncompatibleCacheError, PersistenceError
from blockpool.persistence.format import SUFFIX, load_agent_file, read_header
from blockpool.persistence.safetensors_io import TEMP_PATTERN, file_kind, open_regular, parse_header

#: What ``quarantine`` appends to a bad file's name.
QUARANTINE_MARK = ".corrupt-"


def quarantine(path: Path) -> Path:
    """Move a bad file aside (never delete it; a symbolic link is moved, not followed) and return where it went."""
    path = Path(path)
    target = path.with_name(
        f"{path.name}{QUARANTINE_MARK}{time.strftime('%Y%m%d-%H%M%S')}-{time.monotonic_ns() % 10**6}"
    )
    os.replace(path, target)
    return target


def remove_stale_temp_files(directory: Path, *, max_age: float = 3600.0) -> list[str]:
    """Remove the temporary files that interrupted saves left in ``directory``.

    Only names of the form ``.<name>.<pid>.<ns>.tmp`` are touched, only
    regular files (symbolic links and anything else are left alone and never
    followed), and only stale ones: written by a process that no longer runs
    on this machine, or not modified for ``max_age`` seconds (a save takes
    seconds; this also covers files of other machines on a shared disk).
    A save in progress in a live process is never removed.

    Returns:
        The names removed.

    Raises:
        PersistenceError: The directory cannot be listed.
    """
    try:
        dir_fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise PersistenceError(
            e.errno or errno.EIO, f"cannot list cache directory ({e.strerror or e})", str(directory)
        ) from e
    removed = []
    try:
        now = time.time()
        for name in os.listdir(dir_fd):
            match = TEMP_PATTERN.match(name)
            if match is None:
                continue
            try:
                info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                if not stat.S_ISREG(info.st_mode):
                    continue
                if _process_alive(int(match["pid"])) and now - info.st_mtime < max_age:
                    continue
                os.unlink(name, dir_fd=dir_fd)
                removed.append(name)
            except FileNotFoundError:  # its writer finished (renamed it) or another cleaner got there first
                continue
    finally:
        os.close(dir_fd)
    return removed


def _process_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return pid < 2**22  # exists but is someone else's; an absurd pid is no process
    return True


@dataclass
class FileReport:
    """What ``blockpool inspect`` shows for one entry of a cache directory.

    ``kind`` says how a script should count it: ``"ok"``, ``"corrupt"``
    (the store would set it aside), ``"incompatible"`` (another format
    version), ``"partial"`` (an interrupted save: ignored, removed when a
    store starts), ``"quarantined"`` (already set aside by a store) or
    ``"other"`` (not an agent file: ignored).
    """

    name: str
    status: str
    kind: str = "ok"
    agent_id: str | None = None
    tokens: int | None = None
    size_bytes: int = 0
    fingerprint: str | None = None
    format_version: str | None = None
    kv_bits: int | None = None
    bits: int | None = None  # bits per stored K/V value: kv_bits when quantized, else the layers' dtype size


def describe_cache_dir(directory: Path) -> list[FileReport]:
    """Verify every entry of a cache directory (checksums included) without changing anything.

    Nothing is followed or opened that is not a regular file, so symbolic
    links and FIFOs are reported, never read. Subdirectories are skipped.

    Raises:
        PersistenceError: The directory cannot be listed.
    """
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError as e:
        raise PersistenceError(
            e.errno or errno.EIO, f"cannot list cache directory ({e.strerror or e})", str(directory)
        ) from e
    return [r for entry in entries if (r := _describe(Path(directory) / entry.name)) is not None]


def _describe(path: Path) -> FileReport | None:
    try:
        info = os.lstat(path)
    except OSError:
        return None  # gone meanwhile
    name, size = path.name, info.st_size
    if stat.S_ISDIR(info.st_mode):
        return None
    if QUARANTINE_MARK in name:
        return FileReport(name, "set aside by a store (quarantined)", "quarantined", size_bytes=size)
    if TEMP_PATTERN.match(name):
        return FileReport(name, "partial write (interrupted; ignored)", "partial", size_bytes=size)
    if not name.endswith(SUFFIX):
        return FileReport(name, "not an agent file", "other", size_bytes=size)
    if not stat.S_ISREG(info.st_mode):
        return FileReport(name, f"corrupt: not a regular file ({file_kind(info.st_mode)})", "corrupt", size_bytes=size)
    try:
        file = load_agent_file(path)
        _, metadata, _ = read_header(path)
    except CacheCorruptionError as e:
        if not _is_agent_file(path):
            return FileReport(name, "not an agent file", "other", size_bytes=size)
        return FileReport(name, f"corrupt: {str(e).removeprefix(str(path) + ': ')}", "corrupt", size_bytes=size)
    except IncompatibleCacheError as e:
        return FileReport(
            name, f"incompatible: {str(e).removeprefix(str(path) + ': ')}", "incompatible", size_bytes=size
        )
    except PersistenceError as e:
        return FileReport(name, f"unreadable: {e.strerror}", "corrupt", size_bytes=size)
    sizes = {getattr(mx, layer.geometry.dtype).size * 8 for layer in file.spec.layers}
    bits = file.kv_bits or (sizes.pop() if len(sizes) == 1 else max(sizes))
    return FileReport(
        name,
        "ok",
        "ok",
        file.agent_id,
        len(file.token_ids),
        size,
        file.fingerprint,
        metadata.get("format_version"),
        file.kv_bits,
        bits,
    )


def _is_agent_file(path: Path) -> bool:
    """Whether a file that failed to load claims to be an agent file (else it is some other safetensors file).

    A file whose header does not even parse may be a damaged agent file, so it counts as one.
    """
    try:
        f, size = open_regular(path)
        with f:
            header, _ = parse_header(f, size, path)
    except (CacheCorruptionError, PersistenceError):
        return True
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict):
        return not header or any(not isinstance(v, dict) for v in header.values())  # a bare tensor table is not ours
    return metadata.get("format") == "blockpool-agent" or "checksum" in metadata
