"""The trainer's record of what happened: JSON lines for tools, log lines for people."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import IO, Any

from hivemind.utils.logging import get_logger

logger = get_logger(__name__)


class EventLog:
    """Appends one JSON object per event (`step`, `peer_failed`, `stage_lost`, `stage_recovered`, ...)."""

    def __init__(self, path: str | Path | None):
        self._file: IO[str] | None = open(path, "a", buffering=1) if path else None
        self.counts: dict[str, int] = {}

    def emit(self, event: str, **fields: Any) -> dict[str, Any]:
        record = {"event": event, "time": round(time.time(), 3), **fields}
        self.counts[event] = self.counts.get(event, 0) + 1
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
        if event != "step":
            details = " ".join(f"{k}={v}" for k, v in fields.items())
            logger.info(f"event {event}: {details}")
        return record

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
