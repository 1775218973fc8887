"""Paged attention: running requests read and write their KV in the pool's blocks, in place.

:mod:`.rows` keeps each running sequence's blocks (room for new tokens,
writes, write-back); :mod:`.layer` is the cache the model sees;
:mod:`.dispatch` routes mlx-lm's attention calls for those caches to the
native kernel; :mod:`.support` checks once per model which path it takes.
"""

from blockpool.paged.layer import PagedLayer, attends_in_place
from blockpool.paged.rows import PagedRows, PagedSequence, start_sequence
from blockpool.paged.support import PagedSupport, paged_support

__all__ = [
    "PagedLayer",
    "PagedRows",
    "PagedSequence",
    "PagedSupport",
    "attends_in_place",
    "paged_support",
    "start_sequence",
]
