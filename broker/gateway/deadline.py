"""Deadlines that their owner moves, all of one owner's waited on by one task.

A session has several things that must happen at a time the session keeps
changing: close when a write has been stuck too long, when a pinged client
has not answered, when its credential expires; send the next ping; push a
deferred delivery again when it falls due. Each is a `Deadline`: its owner
moves it (`move`), and `Alarms.run`, one task for all of them, sleeps in a
cancel scope whose deadline is the earliest one, so a move takes effect at
once and nothing wakes up only to compare clocks.

One task for all of an owner's deadlines, not one each: an idle socket is
mostly its tasks and buffers, and a task per deadline made each idle
connection cost a third more memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import trio


class Deadline:
    """A point in trio time (`when`; math.inf: never); its `Alarms` calls `on_pass` once it passes.

    A deadline fires once per move: it is back at infinity when `on_pass`
    runs, and `on_pass` moves it again if it wants another turn.
    """

    def __init__(self, alarms: Alarms, on_pass: Callable[[], object]) -> None:
        self.when = math.inf
        self.on_pass = on_pass
        self._alarms = alarms

    def move(self, when: float) -> None:
        """Set the deadline to `when` (trio time; math.inf: never), earlier or later."""
        self.when = when
        self._alarms.moved()


class Alarms:
    """The deadlines of one owner, and the one task (`run`) that fires them."""

    def __init__(self) -> None:
        self._deadlines: list[Deadline] = []
        self._scope: trio.CancelScope | None = None
        self.stopped = False

    def stop(self) -> None:
        """Fire nothing from now on (the owner is ending: a deadline has nothing left to do)."""
        self.stopped = True
        if self._scope is not None:
            self._scope.cancel()

    def deadline(self, on_pass: Callable[[], object]) -> Deadline:
        """A new deadline, at infinity, whose passing calls `on_pass()` (in the `run` task)."""
        deadline = Deadline(self, on_pass)
        self._deadlines.append(deadline)
        return deadline

    def earliest(self) -> float:
        return min((d.when for d in self._deadlines), default=math.inf)

    def moved(self) -> None:
        if self._scope is not None:
            self._scope.deadline = self.earliest()

    async def run(self) -> None:
        """Fire each deadline as it passes, in the order of the list; until cancelled or stopped.

        A handler that ends the owner (a close) stops the others of the same
        pass: the second of two deadlines that passed together finds nothing
        to do, and must not count or act as if it had.
        """
        while not self.stopped:
            now = trio.current_time()
            for deadline in self._deadlines:
                if self.stopped:
                    return
                if deadline.when <= now:
                    deadline.when = math.inf
                    deadline.on_pass()
            with trio.CancelScope(deadline=self.earliest()) as self._scope:
                await trio.sleep_forever()
            self._scope = None
