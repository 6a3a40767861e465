"""Wall time per phase of a run, for the quantize summary and the manifest (`timing.phases_seconds`).

Example:
    >>> timer = PhaseTimer(load=1.25)
    >>> with timer("weights"):
    ...     pass
    >>> sorted(timer.rounded()), timer.rounded()["load"]
    (['load', 'weights'], 1.25)
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator


class PhaseTimer:
    """Wall time per phase of a run: `with timer("name"):` adds the block's seconds to the phase;
    `with timer.pause("name"):` takes a nested block's seconds back out of an enclosing phase."""

    def __init__(self, **seconds: float) -> None:
        self.seconds: dict[str, float] = dict(seconds)

    def __call__(self, name: str) -> contextlib.AbstractContextManager[None]:
        return self._timed(name, 1.0)

    def pause(self, name: str) -> contextlib.AbstractContextManager[None]:
        return self._timed(name, -1.0)

    @contextlib.contextmanager
    def _timed(self, name: str, sign: float) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + sign * (time.perf_counter() - start)

    def rounded(self) -> dict[str, float]:
        return {name: round(value, 3) for name, value in self.seconds.items()}
