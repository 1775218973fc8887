"""Conversion between an agent's blocks and mlx-lm's per-layer caches.

Reconstruction (:mod:`.rebuild`) gathers every layer in one native call,
straight into the cache the model will write into next, with spare room for
the tokens to come. Write-back is two steps: :mod:`.planning` decides, from
each layer's cache kind alone, which blocks an agent keeps, drops and needs
for a longer history; :mod:`.write_back` then allocates, copies only the
tokens not stored yet, and frees, all or nothing.
"""

from blockpool.cache_conversion.planning import LayerPlan, can_resume, fresh_blocks, plan_extension, resume_point
from blockpool.cache_conversion.rebuild import entry_caches, file_to_mlx_caches, to_mlx_caches
from blockpool.cache_conversion.write_back import extend_blocks, from_mlx_caches, truncate
from blockpool.kinds import Source

__all__ = [
    "LayerPlan",
    "Source",
    "can_resume",
    "entry_caches",
    "extend_blocks",
    "file_to_mlx_caches",
    "fresh_blocks",
    "from_mlx_caches",
    "plan_extension",
    "resume_point",
    "to_mlx_caches",
    "truncate",
]
