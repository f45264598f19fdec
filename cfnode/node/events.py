"""The trainer's record of what happened: JSON lines for tools, log lines for people."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from hivemind.utils.logging import get_logger

logger = get_logger(__name__)


class EventLog:
    """Appends one JSON object per event (`step`, `peer_failed`, `stage_lost`, `stage_recovered`, ...)."""

    def __init__(self, path: str | Path | None):
        self._file: IO[str] | None = open(path, "a", buffering=1) if path else None
        self.counts: dict[str, int] = {}
        self.listeners: list[Callable[[str, dict[str, Any]], None]] = []  # e.g. the trainer's metrics

    def emit(self, event: str, **fields: Any) -> dict[str, Any]:
        record = {"event": event, "time": round(time.time(), 3), **fields}
        self.counts[event] = self.counts.get(event, 0) + 1
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
        for listener in self.listeners:
            try:
                listener(event, record)
            except Exception as e:  # monitoring must never stop a run
                logger.warning(f"event listener failed on {event}: {e}")
        if event != "step":
            details = " ".join(f"{k}={v}" for k, v in fields.items())
            logger.info(f"event {event}: {details}")
        return record

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class EventFollower:
    """Reads the events another process appends to a JSON lines file, a complete line at a time."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.offset = 0
        self.events: list[dict[str, Any]] = []  # everything read so far

    def poll(self) -> list[dict[str, Any]]:
        """The events appended since the last call (a partly written last line waits for the next call)."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except OSError:
            return []
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self.offset += len(complete)
        new = []
        for line in complete.splitlines():
            try:
                new.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        self.events.extend(new)
        return new
