"""Several threads on one store's batch: each waits on its own requests while one of them drives.

``mlx_lm.generate`` may be called from several threads at once; the
drop-in functions may too, and their requests join one batch. A
:class:`SharedDrive` routes a store's events to the requests submitted
through it: a thread that wants its next event takes it from its queue,
or, when the queue is empty and nobody drives, runs one engine iteration
(``AgentMemory.tick``) itself and hands every event to its owner. Only one
thread runs the model at a time; the role passes to whichever waiting
thread needs an event next.

An agent has one request at a time: a caller whose agent is busy with
another caller's request waits for it to end. Events of requests submitted
to the store by other means are not this drive's, and are dropped: do not
drive the store yourself while drop-in calls run on it.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

from blockpool.engine import GenerationEvent
from blockpool.store import AgentMemory

_RESERVED = -1  # an agent claimed by a submit in progress


class SharedDrive:
    """Routes one store's events to the threads whose requests they are."""

    def __init__(self, memory: AgentMemory):
        self.memory = memory
        self._cond = threading.Condition()
        self._queues: dict[int, deque[GenerationEvent]] = {}
        self._agent_of: dict[int, str] = {}
        self._busy: dict[str, int] = {}  # agent -> uid of its request through this drive
        self._driving = False

    def busy(self, agent_id: str) -> bool:
        """Whether a request of this agent, submitted through this drive, is in flight."""
        with self._cond:
            return agent_id in self._busy

    def submit(self, agent_id: str, prompt: Any, *, instead: str | None = None, **options: Any) -> tuple[int, str]:
        """Submit through the drive; returns the uid and the agent it runs as.

        While another caller's request of ``agent_id`` is in flight, the
        request runs as ``instead`` if given (and joins the batch), else it
        waits for that request to end.

        Raises:
            As :meth:`AgentMemory.submit`; nothing is left claimed.
        """
        with self._cond:
            if instead is not None and agent_id in self._busy:
                agent_id = instead
            while agent_id in self._busy:
                self._cond.wait()
            self._busy[agent_id] = _RESERVED
        try:
            uid = self.memory.submit(agent_id, prompt, **options)  # outside the lock: it may read a file
        except BaseException:
            with self._cond:
                del self._busy[agent_id]
                self._cond.notify_all()
            raise
        with self._cond:
            self._busy[agent_id] = uid
            self._agent_of[uid] = agent_id
            self._queues[uid] = deque()
        return uid, agent_id

    def events(self, uids: Iterable[int]) -> Iterator[GenerationEvent]:
        """The events of these requests, in order, until each has completed, driving the store when no one does.

        Leaving early keeps the requests running; their events wait for the next call.
        """
        pending = [uid for uid in uids if uid in self._queues]
        while pending:
            event = self._next(pending)
            if event is None:
                self._drive()
                continue
            if event.completion is not None:
                pending.remove(event.uid)
                self._retire(event.uid)
            yield event

    def _next(self, uids: list[int]) -> GenerationEvent | None:
        """The first waiting event of ``uids``; None when this thread should drive."""
        with self._cond:
            while True:
                for uid in uids:
                    queue = self._queues.get(uid)
                    if queue:
                        return queue.popleft()
                if not self._driving:
                    self._driving = True
                    return None
                self._cond.wait()

    def _drive(self) -> None:
        events: list[GenerationEvent] = []
        try:
            events = self.memory.tick()
            # Another thread may drive next, and it can evaluate only what this thread scheduled.
            self.memory.engine.settle()
        finally:  # route this iteration's events before the next driver can run another
            with self._cond:
                for event in events:
                    queue = self._queues.get(event.uid)
                    if queue is not None:
                        queue.append(event)
                self._driving = False
                self._cond.notify_all()

    def _retire(self, uid: int) -> None:
        with self._cond:
            self._queues.pop(uid, None)
            agent_id = self._agent_of.pop(uid, None)
            if agent_id is not None and self._busy.get(agent_id) == uid:
                del self._busy[agent_id]
            self._cond.notify_all()


_ATTRIBUTE = "_blockpool_shared_drive"
_drives_lock = threading.Lock()


def shared_drive(memory: AgentMemory) -> SharedDrive:
    """The one drive of a store, made on first use and kept on it (so it goes with the store)."""
    with _drives_lock:
        drive = vars(memory).get(_ATTRIBUTE)
        if drive is None:
            drive = SharedDrive(memory)
            setattr(memory, _ATTRIBUTE, drive)
        return drive
