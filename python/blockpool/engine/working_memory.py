"""How much memory a running request takes: the rules the engine budgets with.

A running request holds its history in its blocks and a working copy in
mlx-lm's caches (each layer's capacity is its cache kind's
``working_tokens``: a full layer's grows in steps of 256 tokens, a sliding
layer holds its window, plus a prefill chunk while it prefills), and
while the batch changes shape one layer is copied at a time. These
estimates are what the engine charges before it admits, grows or joins, and
what ``request_bytes`` reports: the most a request can take alone.
"""

from __future__ import annotations

from blockpool.spec import ModelCacheSpec


def token_bytes(spec: ModelCacheSpec, layer_id: int) -> int:
    """Bytes of one token's K and V in a layer's working cache (the model's dtype)."""
    g = spec.layers[layer_id].geometry
    return g.kv_heads * (g.k_head_dim + g.v_head_dim) * g.mx_dtype.size


class WorkingMemory:
    """Working-cache estimates for one model's layout.

    Args:
        spec: The model's cache layout.
        prefill_step_size: Prompt tokens per prefill chunk (a sliding layer
            holds its window plus one chunk while it prefills).
    """

    def __init__(self, spec: ModelCacheSpec, prefill_step_size: int = 2048):
        self.spec, self.prefill_step_size = spec, prefill_step_size
        self._token_bytes = [token_bytes(spec, i) for i in range(spec.num_layers)]

    def _layer_tokens(self, layer_id: int, total: int) -> int:
        return self.spec.kind(layer_id).working_tokens(total, self.spec.block_tokens, self.prefill_step_size)

    def caches(self, total: int, rows: int = 1) -> int:
        """Bytes of ``rows`` sequences' caches at ``total`` tokens (the batch pads every row to the longest)."""
        return sum(rows * self._layer_tokens(i, total) * self._token_bytes[i] for i in range(self.spec.num_layers))

    def layer_copy(self, total: int, rows: int = 1) -> int:
        """The largest single layer of such caches: the old copy alive while one layer grows or changes shape."""
        return max(rows * self._layer_tokens(i, total) * self._token_bytes[i] for i in range(self.spec.num_layers))

    def request(self, total: int, block_bytes: list[int]) -> int:
        """The most a request of ``total`` tokens takes alone: its blocks, its caches and one layer's copy.

        ``block_bytes[i]`` is the bytes of one block of layer ``i`` as the pool stores it.
        """
        blocks = sum(self.spec.blocks_held(i, total) * block_bytes[i] for i in range(self.spec.num_layers))
        return blocks + self.caches(total) + self.layer_copy(total)


def request_bytes(
    spec: ModelCacheSpec,
    tokens: int,
    *,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    prefill_step_size: int = 2048,
) -> int:
    """The most memory one request of ``tokens`` tokens (history, prompt and ``max_tokens``) takes alone.

    A pool's budget must be at least this for such a request to run; a budget
    of ``n`` times this keeps about ``n`` such requests running at once.
    """
    block_bytes = [spec.bytes_per_block(i, kv_bits, kv_group_size) for i in range(spec.num_layers)]
    return WorkingMemory(spec, prefill_step_size).request(tokens, block_bytes)
