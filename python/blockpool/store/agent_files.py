"""The store's agent files: one per agent in its cache directory, named safely, verified on load.

A file that fails verification (damaged, truncated, hostile, or holding
another agent) is moved aside, never deleted, and the error says where it
went; the agent then starts cold. The model fingerprint stored in and
checked against every file is computed on first use (it reads the weights).
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any

from blockpool.errors import CacheCorruptionError
from blockpool.persistence import (
    AgentFile,
    agent_file_name,
    export_agent,
    load_agent_file,
    load_agent_header,
    model_fingerprint,
    quarantine,
    read_header,
    remove_stale_temp_files,
    save_agent_file,
)

log = logging.getLogger("blockpool.memory")


class AgentFiles:
    """Agent files under one directory (or none: then nothing is ever on disk).

    Args:
        cache_dir: The directory; made if missing, and cleared of the
            temporary files interrupted saves left.
        model: The model whose fingerprint the files carry.
        spec: Its cache layout; a file for another layout is refused.
    """

    def __init__(self, cache_dir: str | Path | None, model: Any, spec: Any):
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._model, self.spec = model, spec
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            for name in remove_stale_temp_files(self.cache_dir):
                log.info("removed an interrupted save: %s", name)

    @functools.cached_property
    def fingerprint(self) -> str:
        """The model fingerprint stored in and checked against agent files (computed on first use)."""
        return model_fingerprint(self._model, self.spec)

    def path(self, agent_id: str) -> Path | None:
        """Where an agent's file lives (None without a directory)."""
        return None if self.cache_dir is None else self.cache_dir / agent_file_name(agent_id)

    def exists(self, agent_id: str) -> bool:
        path = self.path(agent_id)
        return path is not None and path.is_file()

    def load(self, agent_id: str) -> AgentFile | None:
        """The agent's file, read and verified; None if it has none.

        Raises:
            CacheCorruptionError: The file failed verification; it was moved aside.
            IncompatibleCacheError, PersistenceError: As :func:`~blockpool.persistence.load_agent_file`.
        """
        return self._read(agent_id, load_agent_file)

    def load_header(self, agent_id: str) -> AgentFile | None:
        """The agent's file without its data (its token ids and layout: see
        :func:`~blockpool.persistence.load_agent_header`); None if it has none.

        Raises:
            As :meth:`load` (damage in the data is found when the whole file is read).
        """
        return self._read(agent_id, load_agent_header)

    def _read(self, agent_id: str, reader: Any) -> AgentFile | None:
        path = self.path(agent_id)
        if path is None or not (path.exists() or path.is_symlink()):
            return None
        try:
            file = reader(path, self.fingerprint, self.spec)
        except CacheCorruptionError as e:
            moved = quarantine(path)
            raise CacheCorruptionError(f"{e} (moved aside to {moved.name})") from e
        if file.agent_id != agent_id:
            moved = quarantine(path)
            raise CacheCorruptionError(
                f"{path} holds agent {file.agent_id!r}, not {agent_id!r} (moved aside to {moved.name})"
            )
        return file

    def export(self, pool: Any, blocks: Any) -> AgentFile:
        """An agent ready to write: backed by its blocks' arrays (no copy), viewed on this thread, so that a
        writer thread only reads memory (MLX streams belong to the thread that made them)."""
        return export_agent(pool, blocks, self.fingerprint)

    def save(self, agent_id: str, file: AgentFile) -> None:
        """Write the agent's file atomically (``PersistenceError`` on failure; the old file stays)."""
        save_agent_file(self.path(agent_id), file)

    def remove(self, agent_id: str) -> None:
        if self.exists(agent_id):
            self.path(agent_id).unlink()

    def count(self) -> int:
        """Agent files in the directory."""
        return 0 if self.cache_dir is None else sum(1 for _ in self.cache_dir.glob("*.safetensors"))

    def listing(self) -> list[tuple[str, int, int]]:
        """``(agent id, tokens, bytes)`` of every readable agent file, from headers only."""
        if self.cache_dir is None:
            return []
        found = []
        for path in sorted(self.cache_dir.glob("*.safetensors")):
            try:
                header, metadata, _ = read_header(path)
                found.append(
                    (json.loads(metadata["agent_id"]), int(header["token_ids"]["shape"][0]), path.stat().st_size)
                )
            except Exception:
                continue  # not an agent file, or damaged: `blockpool inspect` reports those
        return found
