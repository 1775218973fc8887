"""The cache a paged layer gives the model: new K and V go into blocks, attention reads them in place.

mlx-lm's attention code calls ``cache.update_and_fetch(keys, values)`` and
then ``scaled_dot_product_attention(queries, keys, values, cache=cache,
...)``. A :class:`PagedLayer` writes the new keys and values into its rows'
blocks and hands them back unchanged; the dispatch in
:mod:`blockpool.paged.dispatch` sees the cache and runs
:meth:`PagedLayer.attend` over the blocks instead of the arrays it was
given. ``offset`` and ``make_mask`` answer as mlx-lm's own caches do for
RoPE and masks. The kernel applies the causal mask itself, and the window of
a mask the model asked ``make_mask`` for (a windowed layer in a ``KVCache``):
masks it makes are remembered, so the attention knows them when the model
passes them back. A mask the model builds otherwise cannot be applied, and
is refused (:class:`~blockpool.errors.UnsupportedModelError`): the engine's
support check then keeps the model on the gather path.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from blockpool.paged.rows import PagedRows


class PagedLayer:
    """One paged layer of a batch, as the model's cache for that layer.

    Args:
        rows: The batch's paged rows.
        layer_id: The spec entry this cache stands for.
    """

    def __init__(self, rows: PagedRows, layer_id: int):
        self.rows, self.layer_id = rows, layer_id

    @property
    def offset(self) -> int | mx.array:
        """Tokens each row held before this pass: an int for one row (as ``KVCache``), an array for several
        (as ``BatchKVCache``), so that RoPE gets the positions mlx-lm's caches give it."""
        totals = [row.total for row in self.rows.rows]
        return totals[0] if len(totals) == 1 else mx.array(totals)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Write the pass's new K and V into the rows' blocks; return them as given (the attention reads the blocks)."""
        self.rows.write(self.layer_id, keys, values)
        return keys, values

    def attend(self, queries: mx.array, scale: float, mask: Any = None, sinks: mx.array | None = None) -> mx.array:
        """Attention of ``queries`` over every row's blocks: causal, windowed as the layer's kind says and
        as a mask from :meth:`make_mask` says.

        Raises:
            UnsupportedModelError: ``mask`` is one the model made itself.
        """
        return self.rows.attend(self.layer_id, queries, scale, sinks, self.rows.mask_window(mask))

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None) -> Any:
        """The mask mlx-lm's ``KVCache`` would give: None or ``"causal"``, or (for a window, or when
        asked for an array) an array the attention recognises and applies by position itself."""
        if window_size is None and not return_array:
            return None if n == 1 else "causal"
        return self.rows.mask(n, window_size)

    @property
    def state(self) -> list[mx.array]:
        """The arrays being written (what evaluating this cache computes)."""
        return self.rows.arrays(self.layer_id)

    @property
    def nbytes(self) -> int:
        return 0  # the blocks are the pool's; PagedRows reports any working bytes

    def is_trimmable(self) -> bool:
        return False

    def empty(self) -> bool:
        return not any(row.total for row in self.rows.rows)

    def __repr__(self) -> str:
        return f"PagedLayer(layer={self.layer_id}, rows={len(self.rows)})"


def attends_in_place(cache: Any) -> bool:
    """Whether a cache is a paged layer's (its attention runs over blocks)."""
    return isinstance(cache, PagedLayer)
