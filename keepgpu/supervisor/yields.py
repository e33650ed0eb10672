"""Yields: GPUs whose memory is lent to processes the supervisor watches itself (`yield`).

A `yield {gpus, pid}` stops the named GPUs' workers (the bounded stop sequence: a worker that
has exited has freed everything) and keeps them stopped while `pid` lives. The supervisor does
not trust the client to say when it is done: it watches the pid (a pidfd in the poller, or a
polled start time) and starts the workers again once every pid a GPU was yielded to has ended,
however it ended (SIGKILL included). Overlapping yields compose: a GPU holds again after the
last one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Container

from keepgpu.supervisor.lifecycle import SlotLifecycle
from keepgpu.supervisor.slot import Slot
from keepgpu.supervisor.watch import PidSet

log = logging.getLogger("keepgpu.supervisor")


class Yields:
    """The watched pids of every yield; `register`/`unregister` put a pidfd in the poller."""

    def __init__(self, life: SlotLifecycle, register: Callable[[int], None],
                 unregister: Callable[[int], None]) -> None:
        self.life = life
        self.pids = PidSet()
        self.register = register
        self.unregister = unregister

    def add(self, slots: list[Slot], pid: int, now: float) -> None:
        watch = self.pids.add(pid)
        if watch is not None and watch.fd is not None:
            self.register(watch.fd)
        for slot in slots:
            slot.yielded_to.add(pid)
            self.life.begin_stop(slot, "yielded", now)
        log.info("gpu(s) %s yielded to pid %d", ",".join(str(s.gpu) for s in slots), pid)

    def check(self, events: Container[int], now: float) -> None:
        for watch in self.pids.ended(events, now):
            if watch.fd is not None:
                self.unregister(watch.fd)
            watch.close()
            log.info("yield to pid %d ended", watch.pid)
            for slot in self.life.slots.values():
                if watch.pid in slot.yielded_to:
                    slot.yielded_to.discard(watch.pid)
                    self.life.end_yield(slot)
            self.life.dirty = True

    @property
    def next_check(self) -> float:
        return self.pids.next_check

    def close(self) -> None:
        self.pids.close()
