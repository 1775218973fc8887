"""Agent cache files: one safetensors file per agent, written atomically, verified on load.

- :mod:`.format`: the agent file (:class:`AgentFile`), its metadata and
  checksum, saving and verified loading;
- :mod:`.safetensors_io`: the container, read and written by hand, never
  through a link, atomically;
- :mod:`.transfer`: agents between the pool and their files;
- :mod:`.cache_dir`: interrupted saves, quarantine, and inspection of a directory.
"""

from blockpool.errors import CacheCorruptionError, IncompatibleCacheError, PersistenceError
from blockpool.persistence.cache_dir import (
    QUARANTINE_MARK,
    FileReport,
    describe_cache_dir,
    quarantine,
    remove_stale_temp_files,
)
from blockpool.persistence.format import (
    FORMAT_VERSION,
    SUFFIX,
    AgentFile,
    agent_file_name,
    file_metadata,
    file_tensors,
    load_agent_file,
    load_agent_header,
    model_fingerprint,
    read_header,
    save_agent_file,
)
from blockpool.persistence.safetensors_io import TEMP_PATTERN, TEMP_SUFFIX
from blockpool.persistence.safetensors_io import open_regular as open_agent_file
from blockpool.persistence.transfer import BlockRows, as_array, export_agent, import_agent

__all__ = [
    "FORMAT_VERSION",
    "QUARANTINE_MARK",
    "SUFFIX",
    "TEMP_PATTERN",
    "TEMP_SUFFIX",
    "AgentFile",
    "BlockRows",
    "CacheCorruptionError",
    "FileReport",
    "IncompatibleCacheError",
    "PersistenceError",
    "agent_file_name",
    "as_array",
    "describe_cache_dir",
    "export_agent",
    "file_metadata",
    "file_tensors",
    "import_agent",
    "load_agent_file",
    "load_agent_header",
    "model_fingerprint",
    "open_agent_file",
    "quarantine",
    "read_header",
    "remove_stale_temp_files",
    "save_agent_file",
]
