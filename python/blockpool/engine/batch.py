"""The running batch: the sequences decoding together, and their working caches.

Every per-layer cache operation (merging, growing, reading a row) is asked
of the layer's cache kind (:mod:`blockpool.kinds`), so nothing here depends
on which kinds a model uses.

The decode step mirrors mlx-lm's own generation loop (``GenerationBatch``
and ``generate_step``): the model runs on the batch's last tokens, logits
processors and samplers are applied per sequence, and the next step is
launched before the current tokens are read, so that graph building
overlaps computation. The caches are mlx-lm's own classes. A lone
sequence decodes in plain ``KVCache``/``RotatingKVCache`` caches, as
``mlx_lm.stream_generate`` does, and pays for no batch machinery; when a
second one joins, both move into ``BatchKVCache``/``BatchRotatingKVCache``.

Every change of the batch's shape (a sequence joining or leaving, a cache
growing by a step) is done one layer at a time and evaluated before the
next, so that the copy in flight is one layer, not the whole batch: that
is what lets the engine keep all KV inside the pool's budget.

Paged batches (a model whose attention layers all run paged,
:mod:`blockpool.paged`): those layers' caches are views of one
:class:`~blockpool.paged.PagedRows`, which keeps every sequence's K and V in
its blocks and attends over them in place. Sequences join and leave it
without a copy; the other layers (recurrent state) batch as above.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import TokenBuffer
from mlx_lm.sample_utils import greedy_sampler

from blockpool.kinds import Source, arrays_in
from blockpool.paged import PagedLayer, PagedRows, PagedSequence
from blockpool.spec import ModelCacheSpec

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


@dataclass
class Row:
    """One sequence in the batch: who it is, and how its next token is chosen.

    ``context`` is every token fed so far (for logits processors): a list, or
    a callable that makes it, called only if a processor needs it (a long
    history is not copied for a request that has none); ``fed`` counts them.
    """

    owner: Any
    sampler: Sampler | None
    processors: list[LogitsProcessor]
    context: list[int] | Callable[[], list[int]] = field(default_factory=list)
    fed: int = -1  # tokens fed so far (-1: len(context))
    _buffer: TokenBuffer | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.fed < 0:
            self.fed = len(self.context) if isinstance(self.context, list) else 0

    def fetch_context(self, inputs: mx.array) -> mx.array:
        """The token context after appending ``inputs`` (as mlx-lm's ``TokenBuffer``)."""
        if self._buffer is None:
            self._buffer = TokenBuffer(self.tokens())
        return self._buffer.update_and_fetch(inputs)

    def tokens(self) -> list[int]:
        """Every token fed so far."""
        if callable(self.context):
            self.context = self.context()
        return self.context

    def took(self, token: int) -> None:
        """A token was fed (a generated one: the next step's input)."""
        self.fed += 1
        if not callable(self.context):
            self.context.append(token)


def cache_nbytes(caches: Sequence[Any] | None) -> int:
    """Bytes a list of mlx-lm caches holds."""
    return sum(c.nbytes for c in caches) if caches else 0


class DecodeBatch:
    """Sequences that decode together, one model call per step for all of them."""

    def __init__(self, model: nn.Module, spec: ModelCacheSpec, pool: Any = None, paged_layers: Sequence[int] = ()):
        self.model, self.spec = model, spec
        self._kinds = [spec.kind(i) for i in range(spec.num_layers)]
        self._token_bytes = [spec.layers[i].geometry.token_bytes() for i in range(spec.num_layers)]
        self.paged = PagedRows(pool, paged_layers) if paged_layers else None
        self._gathered = [i for i in range(spec.num_layers) if i not in set(paged_layers)]
        self.rows: list[Row] = []
        self.caches: list[Any] | None = None
        self._batched = False  # False: one sequence in plain caches
        self._next_tokens: mx.array | None = None
        self._next_logprobs: list[mx.array] = []

    @classmethod
    def for_prompts(
        cls,
        model: nn.Module,
        spec: ModelCacheSpec,
        rows: list[Row],
        caches: list[list[Any]],
        last_tokens: list[int],
        pool: Any = None,
        sequences: Sequence[PagedSequence] = (),
        paged_layers: Sequence[int] = (),
    ) -> DecodeBatch:
        """A batch of sequences whose prompts are still to be prefilled (see :meth:`prefill`).

        ``caches[i]`` holds row i's history in plain caches; one row keeps them
        (no batch machinery), several are merged into batch caches, one layer
        at a time. Each row's next input is its prompt's last token: the first
        :meth:`step` reads those back (they are not generated tokens) and
        launches each row's first generated token, as mlx-lm's prompt batch does.
        In a paged batch, ``sequences[i]`` holds row i's paged layers (its
        ``caches[i]`` entries of those layers are unused).
        """
        batch = cls(model, spec, pool, paged_layers)
        batch.rows = list(rows)
        if batch.paged is not None:
            batch.paged.extend(sequences)
        if len(rows) == 1:
            batch.caches = list(caches[0])
        else:
            merged: list[Any] = [None] * spec.num_layers
            for layer_id in batch._gathered:
                column = [c[layer_id] for c in caches]
                cache = batch._kinds[layer_id].merge(column)
                _eval_cache(cache)
                for c in caches:
                    c[layer_id] = None  # each layer's single caches can go as soon as they are merged
                merged[layer_id] = cache
            batch.caches, batch._batched = merged, True
        batch._view_paged_layers()
        batch._next_tokens = mx.array(last_tokens, dtype=mx.uint32)
        batch._next_logprobs = [_placeholder()] * len(rows)
        return batch

    def prefill(self, chunks: list[list[int]]) -> int:
        """Run each row's next prompt chunk (rows may give fewer tokens, or none), as mlx-lm's prompt batch does:
        right-padded to the longest, the padding then rolled out of the way. Returns the tokens run."""
        lengths = [len(c) for c in chunks]
        longest = max(lengths)
        if not longest:
            return 0
        if self.paged is not None:
            self.paged.prepare(lengths)
        if not self._batched:
            tokens = mx.array(chunks, dtype=mx.uint32)
            self._forward(tokens)
            mx.eval(arrays_in([c.state for c in self.caches]))
            return longest
        gathered = [self.caches[i] for i in self._gathered]
        for i in self._gathered:  # room for the chunk now, one layer at a time
            self._kinds[i].grow(self.caches[i], longest)
        padding = [longest - n for n in lengths]
        tokens = mx.array([c + [0] * p for c, p in zip(chunks, padding)], dtype=mx.uint32)
        if max(padding):
            for cache in gathered:
                cache.prepare(lengths=lengths, right_padding=padding)
        self._forward(tokens)
        for cache in gathered:
            if max(padding):
                cache.finalize()
            _eval_cache(cache)
        if self.paged is not None:
            mx.eval(self.paged.arrays())
        return sum(lengths)

    def _forward(self, tokens: mx.array) -> mx.array:
        """The model on ``tokens`` with the batch's caches (a paged batch's rows then hold the new tokens)."""
        try:
            out = self.model(tokens, cache=self.spec.assemble(self.caches))
        except BaseException:
            if self.paged is not None:
                self.paged.cancel_pass()
            raise
        if self.paged is not None:
            self.paged.commit()
        return out

    def _view_paged_layers(self) -> None:
        if self.paged is not None and self.caches is not None:
            for i in self.paged.layers:
                self.caches[i] = PagedLayer(self.paged, i)

    def absorb(self, other: DecodeBatch) -> None:
        """Take over another batch's rows (a prompt batch whose first tokens are launched), one layer at a time."""
        if not other.rows:
            return
        if not self.rows:
            self.rows, self.caches, self._batched = other.rows, other.caches, other._batched
            self._next_tokens, self._next_logprobs = other._next_tokens, other._next_logprobs
            if self.paged is not None:
                self.paged.rows = list(other.paged.rows)
                self._view_paged_layers()
            return
        if not self._batched:
            self._batch_up()
        incoming = other.caches if other._batched else self._as_batch(other.caches)
        other.caches = None
        for i in self._gathered:
            mine = self.caches[i]
            mine.extend(incoming[i])
            incoming[i] = None
            _eval_cache(mine)
        if self.paged is not None:
            self.paged.extend(other.paged.rows)
        self.rows += other.rows
        self._next_tokens = mx.concatenate([self._next_tokens, other._next_tokens])
        self._next_logprobs = self._next_logprobs + other._next_logprobs

    def _batch_up(self) -> None:
        """Move a lone sequence's plain caches into one-row batch caches."""
        self.caches = self._as_batch(self.caches)
        self._batched = True
        self._view_paged_layers()

    def _as_batch(self, caches: list[Any]) -> list[Any]:
        """One-row batch caches of a lone sequence's gathered layers (paged layers need none)."""
        out: list[Any] = [None] * self.spec.num_layers
        for i in self._gathered:
            out[i] = self._kinds[i].as_batch(caches[i])
        return out

    def settle(self) -> None:
        """Schedule every array the batch holds (its caches' state, the tokens launched), without waiting.

        A graph built on one thread's stream can be evaluated on another thread
        only once it is scheduled; an array left lazy (a cache's offset bumped
        after the step was launched, say) could not be.
        """
        arrays = [self._next_tokens, *self._next_logprobs] if self._next_tokens is not None else []
        for cache in self.caches or []:
            arrays += arrays_in(cache.state)
        mx.async_eval(arrays)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def nbytes(self) -> int:
        """Bytes of the working caches (a paged batch: its layers' working bytes beyond their blocks)."""
        paged = self.paged.nbytes() if self.paged is not None else 0
        return cache_nbytes(self.caches) + paged

    # ------------------------------------------------------------ stepping

    def step(self) -> list[tuple[Row, int, mx.array]]:
        """Read the tokens launched last step and launch the next step.

        Returns:
            ``(row, token, logprobs)`` for every row, in row order.
        """
        if not self.rows:
            return []
        current, current_logprobs = self._next_tokens, self._next_logprobs
        if self.paged is not None:
            self.paged.prepare([1] * len(self.rows))
        logits = self._forward(current[:, None])[:, -1, :]
        contexts = []
        if any(row.processors for row in self.rows):
            processed = []
            for e, row in enumerate(self.rows):
                sample_logits = logits[e : e + 1]
                if row.processors:
                    context = row.fetch_context(current[e : e + 1])
                    contexts.append(context)
                    for processor in row.processors:
                        sample_logits = processor(context, sample_logits)
                processed.append(sample_logits)
            logits = mx.concatenate(processed, axis=0)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        samplers = [row.sampler or greedy_sampler for row in self.rows]
        if all(s is samplers[0] for s in samplers):
            sampled = samplers[0](logprobs)
        else:
            sampled = mx.concatenate([s(logprobs[e : e + 1]) for e, s in enumerate(samplers)], axis=0)
        self._next_tokens = sampled
        self._next_logprobs = list(logprobs)
        mx.async_eval(self._next_tokens, self._next_logprobs, contexts)
        mx.eval(current, current_logprobs)
        tokens = current.tolist()
        for row, token in zip(self.rows, tokens):
            row.took(token)
        return list(zip(self.rows, tokens, current_logprobs))

    def pending(self, index: int) -> tuple[int, mx.array]:
        """The token (and its log-probabilities) row ``index`` will emit next: sampled, not yet read."""
        mx.eval(self._next_tokens, self._next_logprobs[index])
        return int(self._next_tokens[index].item()), self._next_logprobs[index]

    # ------------------------------------------------------------ shape changes

    def join(
        self,
        row: Row,
        caches: list[Any],
        next_token: mx.array,
        next_logprobs: mx.array,
        sequence: PagedSequence | None = None,
    ) -> None:
        """Add a sequence whose plain caches (and, in a paged batch, ``sequence``) hold its history and
        whose next token is launched."""
        if self.paged is not None:
            self.paged.extend([sequence])
        if not self.rows:
            self.rows, self.caches, self._batched = [row], list(caches), False
            self._next_tokens, self._next_logprobs = next_token.reshape(-1), [next_logprobs]
            self._view_paged_layers()
            return
        if not self._batched:
            self._batch_up()
        incoming = self._as_batch(caches)
        caches.clear()  # the batch holds the only reference: each layer's copy can be freed as it goes
        for i in self._gathered:
            mine = self.caches[i]
            mine.extend(incoming[i])
            incoming[i] = None
            _eval_cache(mine)
        self.rows.append(row)
        self._next_tokens = mx.concatenate([self._next_tokens, next_token.reshape(-1)])
        self._next_logprobs.append(next_logprobs)

    def abandon(self, indices: Sequence[int]) -> None:
        """Rows that leave without writing back (cancelled, failed): a paged batch frees the blocks they
        took while running and puts back the ones they wrote in place, so their handles are as they were."""
        if self.paged is not None:
            for index in indices:
                self.paged.abandon(index)

    def remove(self, indices: Sequence[int]) -> None:
        """Drop rows (finished, cancelled or preempted) and the memory they held."""
        gone = set(indices)
        keep = [i for i in range(len(self.rows)) if i not in gone]
        if self.paged is not None:
            self.paged.keep(keep)
        if not keep:
            self.rows, self.caches, self._batched = [], None, False
            self._next_tokens, self._next_logprobs = None, []
            return
        if self._batched:
            for i in self._gathered:
                cache = self.caches[i]
                cache.filter(keep)
                _eval_cache(cache)
        self.rows = [self.rows[i] for i in keep]
        self._next_tokens = self._next_tokens[mx.array(keep)]
        self._next_logprobs = [self._next_logprobs[i] for i in keep]

    def growth_bytes(self) -> int:
        """Working bytes the next step adds (caches that are full grow by a step)."""
        if not self.rows:
            return 0
        extra = self.paged.growth_bytes() if self.paged is not None else 0
        for i in self._gathered:
            extra += self._kinds[i].growth_tokens(self.caches[i]) * len(self.rows) * self._token_bytes[i]
        return extra

    def grow(self) -> None:
        """Give every full cache room for the next token now, one layer at a time.

        mlx-lm grows a full cache inside the model call, where every layer's
        old and new arrays are alive at once; growing here, with an eval per
        layer, keeps that copy to one layer. The new shape is the one mlx-lm
        would make, so the model sees the same arrays.
        """
        for i in self._gathered if self.caches else []:
            self._kinds[i].grow(self.caches[i])

    # ------------------------------------------------------------ reading a row

    def row_caches(self, index: int) -> tuple[dict[int, Source], dict[int, int]]:
        """Row ``index``'s tokens per gathered layer in time order ``(keys, values, first position)``,
        and the ring index of any rotated sliding layer of them (paged layers hold theirs in blocks)."""
        sources, ring = {}, {}
        for layer_id in self._gathered:
            kind, cache = self._kinds[layer_id], self.caches[layer_id]
            if self._batched:
                source, r = kind.read_row(cache, index)
            else:
                source, r = kind.read(cache), kind.ring_index(cache)
            sources[layer_id] = source
            if r is not None:
                ring[layer_id] = r
        return sources, ring

    def row_states(self, index: int, layers: Sequence[int]) -> dict[int, Any]:
        """Row ``index``'s state in the given (recurrent) layers: copies, never the live arrays."""
        out = {}
        for layer_id in layers:
            kind, cache = self._kinds[layer_id], self.caches[layer_id]
            out[layer_id] = kind.read_row(cache, index)[0] if self._batched else kind.read(cache)
        return out

    def row_tokens(self, index: int) -> int:
        """Tokens row ``index``'s caches hold (a token layer's offset; else the tokens fed to the model)."""
        if self.paged is not None:
            return self.paged.rows[index].total
        token_layer = next((i for i, k in enumerate(self._kinds) if k.storage == "tokens"), None)
        if token_layer is None:
            return self.rows[index].fed
        cache = self.caches[token_layer]
        offset = cache.offset if not self._batched else cache.offset[index]
        return int(offset.item()) if isinstance(offset, mx.array) else int(offset)


_PLACEHOLDER: list[mx.array] = []


def _placeholder() -> mx.array:
    """Log-probabilities for a prompt's last token, which has none. Evaluated once: an unevaluated
    one would make the first step wait for the model's forward pass instead of overlapping it."""
    if not _PLACEHOLDER:
        placeholder = mx.zeros((1,))
        mx.eval(placeholder)
        _PLACEHOLDER.append(placeholder)
    return _PLACEHOLDER[0]


def _eval_cache(cache: Any) -> None:
    """Evaluate a cache's arrays (its state mixes arrays, lists of them and plain numbers)."""
    mx.eval(arrays_in(cache.state))
