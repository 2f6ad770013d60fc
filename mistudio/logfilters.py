"""Logging filters named in settings.LOGGING."""

import logging
import threading


class OncePerProcess(logging.Filter):
    """Lets each distinct message template through once per process.

    bitsandbytes warns "MatMul8bitLt: inputs will be cast from torch.float32 to float16" on
    every int8 matmul on CPU: thousands of identical lines per perplexity run or extraction.
    Once is enough to tell the reader; the rest drowns the job log."""

    def __init__(self, name: str = "") -> None:
        super().__init__(name)
        self._seen: set[tuple[str, object]] = set()
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.msg)
        with self._lock:
            if key in self._seen:
                return False
            self._seen.add(key)
        return True
