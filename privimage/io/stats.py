"""A stage's own log of its steps, ``stats.jsonl``: appended line by line, and cut back to
the last checkpoint when a crashed stage resumes, so every step is logged exactly once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from privimage.io.atomic import write_text

STATS = "stats.jsonl"


def truncate_jsonl(path: Path, *, max_step: int) -> None:
    """Keep only the lines of a ``stats.jsonl`` whose ``step`` is at most ``max_step``.

    A resumed stage replays the steps after its checkpoint; their lines from the crashed
    attempt are dropped first so every step is logged exactly once.
    """
    path = Path(path)
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line torn by the crash
        if record.get("step", 0) <= max_step:
            kept.append(line)
    write_text(path, "".join(f"{line}\n" for line in kept))


class StatsWriter:
    """Append one JSON object per line to ``stats.jsonl`` (flushed, so a crash loses little),
    and log each line's numbers to an experiment tracker when one is given
    (:func:`privimage.io.trackers.open_tracker`), which it finishes on :meth:`close`."""

    def __init__(self, path: Path, *, tracker: Any = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a")  # noqa: SIM115 (closed by close())
        self.tracker = tracker

    @classmethod
    def resume(cls, path: Path, *, after_step: int, tracker: Any = None) -> StatsWriter:
        """A writer for a stage that continues after ``after_step`` (0: from the start),
        with the lines of later steps from a crashed attempt dropped first."""
        truncate_jsonl(path, max_step=after_step)
        return cls(path, tracker=tracker)

    def write(self, **stats: Any) -> None:
        self._f.write(json.dumps(stats) + "\n")
        self._f.flush()
        if self.tracker is not None:
            numbers = {
                k: v
                for k, v in stats.items()
                if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)
            }
            self.tracker.log(numbers, step=stats.get("step"))

    def close(self) -> None:
        self._f.close()
        if self.tracker is not None:
            self.tracker.finish()
