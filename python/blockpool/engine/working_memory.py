"""How much memory a running request takes: the rules the engine budgets with.

A running request holds its history in its blocks and, in a layer that
gathers, a working copy in mlx-lm's caches (each layer's size is its cache
kind's ``working_bytes``: a full layer's capacity grows in steps of 256
tokens, a sliding layer holds its window plus a prefill chunk while it
prefills, a recurrent layer its fixed-size state), and while the batch
changes shape one layer is copied at a time. A paged layer
(:mod:`blockpool.paged`) has no working copy: its request's new tokens go
straight into new blocks, which admission must find room for (and, in a
quantized pool, their full-precision arrays until the request ends). These
estimates are what the engine charges before it admits, grows or joins, and
what ``request_bytes`` reports: the most a request can take alone.
"""

from __future__ import annotations

from blockpool.spec import ModelCacheSpec


class WorkingMemory:
    """Working-cache estimates for one model's layout.

    Args:
        spec: The model's cache layout.
        prefill_step_size: Prompt tokens per prefill chunk (a sliding layer
            holds its window plus one chunk while it prefills).
        checkpoint_every: The recurrent checkpoint grid in tokens (None: no
            grid), for the snapshots a request's recurrent layers keep.
        paged: Per paged layer, the bytes a block written while its request
            runs takes (the pool's block, plus its full-precision arrays in
            a quantized pool).
        stored: Per paged layer, the bytes a block takes as the pool stores it.
    """

    def __init__(
        self,
        spec: ModelCacheSpec,
        prefill_step_size: int = 2048,
        checkpoint_every: int | None = None,
        paged: dict[int, int] | None = None,
        stored: dict[int, int] | None = None,
    ):
        self.spec, self.prefill_step_size, self.checkpoint_every = spec, prefill_step_size, checkpoint_every
        self.paged, self.stored = dict(paged or {}), dict(stored or {})

    def _layer_bytes(self, layer_id: int, total: int) -> int:
        if layer_id in self.paged:
            return 0  # no working copy: it reads its blocks in place
        layer = self.spec.layers[layer_id]
        return layer.kind.working_bytes(layer.geometry, total, self.spec.block_tokens, self.prefill_step_size)

    def caches(self, total: int, rows: int = 1) -> int:
        """Bytes of ``rows`` sequences' caches at ``total`` tokens (the batch pads every row to the longest)."""
        return sum(rows * self._layer_bytes(i, total) for i in range(self.spec.num_layers))

    def new_blocks(self, history: int, total: int, copy_last: bool = True) -> int:
        """Bytes of the blocks a paged request writes while it grows from ``history`` to ``total`` tokens
        and decodes one more: its new tokens' blocks, and (``copy_last``: a history in blocks other
        agents may share) a copy of its partly filled last block; a sliding layer frees what leaves
        its window, so it holds at most its window's blocks and one more."""
        b, out = self.spec.block_tokens, 0
        for i, block_bytes in self.paged.items():
            n = -(-(total + 1) // b) - -(-history // b) + (1 if copy_last and history % b else 0)
            most = self.spec.kind(i).max_blocks(b)
            out += (n if most is None else min(n, most + 1)) * block_bytes
        return out

    def imported(self, history: int, file_bytes: int) -> int:
        """Bytes a paged request's history of ``file_bytes`` adds when it arrives as a file and is written
        into blocks layer by layer, each layer of the file let go once written: its blocks beyond the
        file, and one layer at most held twice (gathered layers copy it into their working caches,
        which :meth:`caches` counts)."""
        layers = [self.spec.blocks_held(i, history) * block_bytes for i, block_bytes in self.stored.items()]
        return max(0, sum(layers) - file_bytes) + max(layers, default=0)

    def layer_copy(self, total: int, rows: int = 1) -> int:
        """The largest single layer of such caches: the old copy alive while one layer grows or changes shape."""
        return max((rows * self._layer_bytes(i, total) for i in range(self.spec.num_layers)), default=0)

    def snapshots(self, total: int) -> int:
        """Snapshots a recurrent layer keeps for a ``total``-token agent at most: the grid, the end of the
        prompt, the previous turn's end and the last token."""
        return (total // self.checkpoint_every if self.checkpoint_every else 0) + 3

    def request(self, total: int, block_bytes: list[int]) -> int:
        """The most a request of ``total`` tokens takes alone: its blocks, its caches and one layer's copy.

        ``block_bytes[i]`` is the bytes of one block of layer ``i`` as the pool stores it.
        """
        blocks = 0
        for i in range(self.spec.num_layers):
            held = self.snapshots(total) if self.spec.kind(i).storage == "state" else self.spec.blocks_held(i, total)
            # a paged layer's blocks written while it runs may cost more than a stored block (quantized pools)
            blocks += held * max(block_bytes[i], self.paged.get(i, 0)) + (1 if i in self.paged else 0) * block_bytes[i]
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
