"""Work that ends early: cancelled requests and a model that fails mid-step.

:class:`Interruptions` is a mixin of :class:`~blockpool.engine.step.Stepper`.
A cancelled request leaves the prompt batch or the running batch at the
next iteration; a failure (or Ctrl-C) inside the model ends every request
the failed batch held. Either way the requests end through ``endings``
with their histories kept, and the working memory they held is charged
off at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from blockpool.engine.batch import DecodeBatch

log = logging.getLogger("blockpool")


class Interruptions:
    """Cancels and failures for a stepper (its ``batch``, ``admission``, ``endings``, ``charge``)."""

    batch: DecodeBatch
    admission: Any
    endings: Any
    model: Any
    spec: Any
    _join_reserved: int
    charge: Callable[[], None]  # the stepper's: charge what the working caches hold
    new_batch: Callable[[], DecodeBatch]  # the stepper's: an empty running batch

    @staticmethod
    def _abandon_all(batch: DecodeBatch) -> None:
        """Every row of a failed or dropped batch leaves without writing back (histories as they were)."""
        try:
            batch.abandon(range(len(batch.rows)))
        except Exception:  # a block written in place could not be put back: its history is lost, say so
            log.exception("blockpool: a failed batch's blocks could not all be put back")

    def _cancel_flagged(self) -> None:
        admission = self.admission
        if admission is not None and any(r.cancel for r in admission.requests):
            gone = [i for i, r in enumerate(admission.requests) if r.cancel]
            if len(gone) == len(admission.requests):
                self._drop_admission(reason="cancelled")
            else:
                ended = [admission.requests[i] for i in gone]
                admission.batch.abandon(gone)
                admission.batch.remove(gone)
                admission.requests = [r for r in admission.requests if not r.cancel]
                for request in ended:
                    self.endings.abandon(request, "cancelled")
                self.charge()
        rows = [i for i, row in enumerate(self.batch.rows) if row.owner.cancel]
        if rows:
            gone_requests = [self.batch.rows[i].owner for i in rows]
            self.batch.abandon(rows)
            self.batch.remove(rows)
            for request in gone_requests:
                self.endings.abandon(request, "cancelled")
            self.charge()

    def fail_batch(self, error: BaseException) -> None:
        """The model failed (or was interrupted) mid-step: end every running request, keep their histories."""
        failed = [row.owner for row in self.batch.rows]
        self._abandon_all(self.batch)
        self.batch = self.new_batch()
        self.charge()
        for request in failed:
            self.endings.abandon(request, "error", error)

    def _drop_admission(self, error: BaseException | None = None, reason: str = "error") -> None:
        """End the admitted group (its prefill failed, or all were cancelled) and free the working memory it held."""
        admission, self.admission = self.admission, None
        if admission is not None:
            self._abandon_all(admission.batch)
        self._join_reserved = 0
        self.charge()
        for request in admission.requests if admission else []:
            self.endings.abandon(request, reason, error)
