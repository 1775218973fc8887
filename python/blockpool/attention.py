"""The attention kinds under their earlier name: see :mod:`blockpool.kinds`.

``FullAttention`` and ``SlidingWindow`` are the handlers of full and
sliding-window attention layers; ``rules_for(window)`` is
:func:`blockpool.kinds.kind_for`.
"""

from __future__ import annotations

from blockpool.kinds import FullAttention, SlidingWindow, blocks_for
from blockpool.kinds import kind_for as rules_for

AttentionRules = FullAttention | SlidingWindow

__all__ = ["AttentionRules", "FullAttention", "SlidingWindow", "blocks_for", "rules_for"]
