"""Progress bookkeeping shared by every job: a throttle and a transfer-rate meter."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable


class ProgressThrottle:
    """Lets an update through when `min_interval` seconds have passed or progress moved by
    `min_step` points since the last one, and never when nothing changed."""

    def __init__(
        self, min_interval: float = 0.5, min_step: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.min_interval = min_interval
        self.min_step = min_step
        self.clock = clock
        self._last_time: float | None = None
        self._last_progress: float | None = None

    def should_emit(self, progress: float, force: bool = False) -> bool:
        now = self.clock()
        if not force and self._last_time is not None:
            assert self._last_progress is not None
            moved = abs(progress - self._last_progress)
            if moved == 0:
                return False
            if moved < self.min_step and now - self._last_time < self.min_interval:
                return False
        self._last_time = now
        self._last_progress = progress
        return True


class TransferRate:
    """Bytes per second over a sliding window, and the time left at that rate."""

    def __init__(self, window_seconds: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window_seconds
        self.clock = clock
        self._samples: deque[tuple[float, int]] = deque()

    def add(self, bytes_done: int) -> None:
        now = self.clock()
        self._samples.append((now, bytes_done))
        while len(self._samples) > 2 and now - self._samples[0][0] > self.window:
            self._samples.popleft()

    def bytes_per_second(self) -> float:
        if len(self._samples) < 2:
            return 0.0
        (t0, b0), (t1, b1) = self._samples[0], self._samples[-1]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0

    def eta_seconds(self, bytes_total: int) -> float | None:
        speed = self.bytes_per_second()
        if speed <= 0 or not self._samples:
            return None
        return max(0.0, (bytes_total - self._samples[-1][1]) / speed)
