"""
A timer for silence: the upstream client's idle timeout and a client's
stall limit are both "nothing happened for N seconds".
"""

from __future__ import annotations

from typing import Callable, Optional

from twisted.internet.interfaces import IDelayedCall, IReactorTime


class IdleTimer:
    """
    Calls ``expire`` once ``timeout`` seconds pass without a :meth:`touch`.

    :ivar expired: whether it fired (so that a failure it caused can be told
        from others).
    """

    def __init__(self, clock: IReactorTime, timeout: float, expire: Callable[[], None]):
        self._clock = clock
        self.timeout = timeout
        self._expire = expire
        self._call: Optional[IDelayedCall] = None
        self.expired = False

    @property
    def running(self) -> bool:
        return self._call is not None

    def touch(self) -> None:
        """Something happened: start counting again (or start at all)."""
        if self._call is not None:
            self._call.reset(self.timeout)
        else:
            self._call = self._clock.callLater(self.timeout, self._fire)

    def stop(self) -> None:
        if self._call is not None:
            self._call.cancel()
            self._call = None

    def _fire(self) -> None:
        self._call = None
        self.expired = True
        self._expire()
