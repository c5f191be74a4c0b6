"""``privacy.json``: the run's one record of every mechanism that touched sensitive data.

The ledger refuses a mechanism before it touches sensitive data if it would overrun the
budget, and recomputes epsilon from the whole history (:mod:`privimage.dp.accounting`) on
every write.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from privimage.dp.accounting import (
    Mechanism,
    check_accountant,
    check_delta_range,
    epsilon_spent,
)
from privimage.errors import ConfigError, PrivacyBudgetError
from privimage.io.artifacts import LEDGER
from privimage.io.atomic import write_text

if TYPE_CHECKING:
    from privimage.config.schema import Config

# Calibration aims the total epsilon exactly at the target, so the ledger's check must not
# trip on the last bits of floating-point noise when the calibrated mechanism is recorded.
_BUDGET_RTOL = 1e-9

# "abandoned": an attempt that drew secret noise and was then restarted from scratch. It
# stays in the history (composed with the rerun): its outputs may have been seen, and the
# rerun's fresh noise makes the two attempts two releases.
_STATUSES = ("started", "completed", "abandoned")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _within_budget(epsilon: float, target: float) -> bool:
    return epsilon <= target * (1 + _BUDGET_RTOL)


class Ledger:
    """privacy.json at the run root: the run's one record of every mechanism that touched
    sensitive data.

    File layout (pretty JSON)::

        {"accountant": "rdp", "delta": 1e-05, "target_epsilon": 10.0,
         "epsilon_spent": 9.99,
         "noise_secret": true, "differentially_private": true,
         "mechanisms": [{...Mechanism.to_dict(), "noise_secret": true,
                         "status": "started" | "completed" | "abandoned",
                         "epsilon_after": 0.37, "time": "2025-01-01T00:00:00+00:00",
                         "details": {...}  # optional, e.g. which parameters DP-SGD trained
                        }],
         "non_private": [...], "measurements": [...],
         "events": [{"event": "begin" | "resume" | "restart" | "complete" | ...,
                     ...Mechanism.to_dict(), "epsilon_spent": 0.37, "time": ...}]}

    ``mechanisms`` is the current account: one live entry per ``(stage, name)``, plus the
    abandoned attempts of it (see :meth:`begin`), which are composed like any other;
    ``events`` is the append-only journal of how it got there (entries are only ever
    added), so a resumed or restarted stage stays visible. ``noise_secret`` is false as
    soon as one mechanism drew its noise from the run's seed (``reproducible_noise``):
    then no epsilon holds against anyone who knows the config. ``measurements`` lists
    what was computed from the sensitive data outside any mechanism for the data owner
    (e.g. the selection judge): not released, so not accounted. ``epsilon_after`` is the
    epsilon of the history up to and including that entry; ``epsilon_spent`` is the whole
    history, started entries included (a started entry is a mechanism that may have
    touched data). Both are recomputed from the whole history on every write, and every
    write is atomic (temporary file + ``os.replace``), so a crash never leaves a
    half-written record. The ledger assumes one writer at a time (stages of a run execute
    sequentially).

    Args:
        path: Location of ``privacy.json``.
        target_epsilon: The run's total budget.
        delta: The run's delta.
        accountant: ``"rdp"`` or ``"prv"``.

    Raises:
        ConfigError: An existing file disagrees on target, delta or accountant (the budget
            of a run cannot change once data was touched), or cannot be read.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, target_epsilon: float, delta: float, accountant: str
    ) -> None:
        check_accountant(accountant)
        check_delta_range(delta)
        if not (math.isfinite(target_epsilon) and target_epsilon > 0):
            raise ConfigError(f"privacy.target_epsilon={target_epsilon} must be > 0")
        self.path = Path(path)
        self.target_epsilon = float(target_epsilon)
        self.delta = float(delta)
        self.accountant = accountant
        self._entries: list[dict[str, Any]] = []
        self._events: list[dict[str, Any]] = []
        self._non_private: list[dict[str, Any]] = []
        self._measurements: list[dict[str, Any]] = []
        if self.path.exists():
            self._load()
            self._epsilon_spent = self._history_epsilon(self.history)
        else:
            self._write()

    # ---- reading ----------------------------------------------------------------------

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"cannot read the privacy ledger {self.path} ({exc}); it is the run's record "
                "of spent privacy, so restore it or start a new run directory"
            ) from exc
        expected = {
            "target_epsilon": self.target_epsilon,
            "delta": self.delta,
            "accountant": self.accountant,
        }
        for key, value in expected.items():
            found = data.get(key)
            same = (
                found == value
                if isinstance(value, str)
                else isinstance(found, (int, float))
                and math.isclose(float(found), value, rel_tol=1e-12)
            )
            if not same:
                raise ConfigError(
                    f"{self.path} was written with {key}={found!r} but this run has "
                    f"privacy.{key}={value!r}; a run's budget cannot change after it touched "
                    f"sensitive data: set privacy.{key}={found!r} or use a new run directory"
                )
        entries = data.get("mechanisms", [])
        for entry in entries:
            Mechanism.from_dict(entry)  # validates
            if entry.get("status") not in _STATUSES:
                raise ConfigError(f"{self.path}: unknown status {entry.get('status')!r}")
        self._entries = [dict(e) for e in entries]
        self._events = [dict(e) for e in data.get("events", [])]
        self._non_private = [dict(e) for e in data.get("non_private", [])]
        self._measurements = [dict(e) for e in data.get("measurements", [])]

    @property
    def history(self) -> list[Mechanism]:
        """Every recorded mechanism (started, completed or abandoned), in the order they
        began: what the accountant composes."""
        return [Mechanism.from_dict(e) for e in self._entries]

    @property
    def noise_secret(self) -> bool:
        """True when every mechanism drew its randomness from secret OS entropy.

        Entries without the field come from ledgers written before the noise was secret,
        when it always followed the seed, so they count as not secret.
        """
        return all(e.get("noise_secret", False) for e in self._entries)

    def prior(
        self, key: tuple[str, str], *, resuming: bool, noise_secret: bool = True
    ) -> list[Mechanism]:
        """The history a new or resumed attempt of mechanism ``key`` composes with.

        Args:
            key: ``(stage, name)`` of the mechanism about to begin.
            resuming: True when the attempt continues the live started entry from its
                checkpoint (and so its random streams): that entry is the same
                mechanism, not a prior one. False for a fresh attempt: a live started
                entry is then abandoned and stays in the history, unless both it and the
                new attempt draw seeded noise (the new one replays it). A live completed
                entry is never prior: beginning it again is refused by :meth:`begin`.
            noise_secret: Whether the new attempt's noise is secret.
        """
        index = self._find(key)
        prior = []
        for i, entry in enumerate(self._entries):
            if i == index and (
                resuming
                or entry["status"] == "completed"
                or self._replays(entry, noise_secret=noise_secret)
            ):
                continue  # continued, refused, or replaced by an identical replay
            prior.append(Mechanism.from_dict(entry))
        return prior

    @staticmethod
    def _replays(entry: dict[str, Any], *, noise_secret: bool) -> bool:
        """A fresh attempt replays ``entry`` draw for draw only if both follow the seed."""
        seeded = entry.get("noise_secret") is False and not noise_secret
        return entry["status"] == "started" and seeded

    @property
    def epsilon_spent(self) -> float:
        """Epsilon of the whole history (as last written to the file)."""
        return self._epsilon_spent

    def status(self, stage: str, name: str) -> str | None:
        """``"started"``, ``"completed"`` or ``None`` for the mechanism ``(stage, name)``."""
        index = self._find((stage, name))
        return None if index is None else self._entries[index]["status"]

    def live(self, stage: str, name: str) -> Mechanism | None:
        """The live (started or completed, not abandoned) entry of ``(stage, name)``."""
        index = self._find((stage, name))
        return None if index is None else Mechanism.from_dict(self._entries[index])

    def _find(self, key: tuple[str, str]) -> int | None:
        """Index of the live (not abandoned) entry of ``key``."""
        for i, entry in enumerate(self._entries):
            if (entry["stage"], entry["name"]) == key and entry["status"] != "abandoned":
                return i
        return None

    def _history_epsilon(self, history: Sequence[Mechanism]) -> float:
        return epsilon_spent(history, delta=self.delta, accountant=self.accountant)

    # ---- writing ----------------------------------------------------------------------

    def begin(
        self,
        mechanism: Mechanism,
        *,
        noise_secret: bool = True,
        resume_from_step: int = 0,
        details: dict[str, Any] | None = None,
    ) -> None:
        """Record ``mechanism`` as started; call it BEFORE the mechanism touches sensitive data.

        Args:
            mechanism: The mechanism with its planned parameters.
            noise_secret: Whether its randomness comes from secret OS entropy (false
                under ``privacy.reproducible_noise``: then it follows the seed).
            resume_from_step: Nonzero when a crashed stage continues from a checkpoint
                taken after that many steps. The planned mechanism must then be exactly
                the one already started: the steps before the checkpoint are part of it,
                and the steps after it are replayed with the same random stream, so the
                run as a whole still releases one instance of ``mechanism``.
            details: What else a reader of the record needs to know about the release and
                the accountant does not (for DP-SGD: which parameters were trained);
                stored with the entry as ``details``.

        Raises:
            PrivacyBudgetError: The history plus this mechanism would exceed the target
                (checked before anything is written), or ``(stage, name)`` already
                completed in this run (running it again would spend its budget twice).
            ConfigError: ``resume_from_step`` is given but no identical mechanism was
                started (the run's settings changed since the checkpoint).
        """
        index = self._find(mechanism.key)
        if index is not None and self._entries[index]["status"] == "completed":
            raise PrivacyBudgetError(
                f"{mechanism.stage}/{mechanism.name} already completed in this run "
                f"({self.path}); running it again would spend its privacy twice; keep its "
                "output or start a new run directory"
            )
        if resume_from_step:
            started = None if index is None else Mechanism.from_dict(self._entries[index])
            if started != mechanism:
                raise ConfigError(
                    f"cannot resume {mechanism.describe()} from step {resume_from_step}: "
                    f"the ledger has {started.describe() if started else 'no such mechanism'}"
                    " started; restore the run's original settings, or delete the stage's "
                    "checkpoint to restart it from step 0"
                )
            event = "resume"
            others = self.prior(mechanism.key, resuming=True)
        else:
            # A started-but-not-completed entry without a checkpoint is an attempt that
            # crashed. With secret noise the rerun draws fresh noise, so the two attempts
            # are two releases (whatever the first let out may have been seen): the old
            # entry is kept as abandoned and composed. With seeded noise the rerun replays
            # the very same mechanism, and the old entry is replaced.
            event = "begin" if index is None else "restart"
            others = self.prior(mechanism.key, resuming=False, noise_secret=noise_secret)
        would_be = self._history_epsilon([*others, mechanism])
        if not _within_budget(would_be, self.target_epsilon):
            raise PrivacyBudgetError(
                f"{mechanism.describe()} would bring epsilon to {would_be:.4g} > "
                f"privacy.target_epsilon={self.target_epsilon:g} (delta={self.delta:g}); "
                "refused before touching sensitive data"
            )
        entry = {
            **mechanism.to_dict(),
            "noise_secret": bool(noise_secret),
            "status": "started",
            "epsilon_after": None,
            "time": _now(),
        }
        if details:
            entry["details"] = dict(details)
        extra: dict[str, Any] = {"noise_secret": bool(noise_secret)}
        if resume_from_step:
            extra["from_step"] = int(resume_from_step)
            self._entries[index] = entry
        elif index is None:
            self._entries.append(entry)
        elif self._replays(self._entries[index], noise_secret=noise_secret):
            self._entries[index] = entry
        else:
            self._entries[index]["status"] = "abandoned"
            self._entries.append(entry)
            extra["abandoned_attempt"] = True
        self._write(event=(event, mechanism, extra))

    def complete(self, mechanism: Mechanism) -> None:
        """Mark ``(stage, name)`` completed, recording the parameters it actually ran with.

        Args:
            mechanism: The mechanism as it actually ran (e.g. the actual number of steps).

        Raises:
            RuntimeError: No started entry for ``(stage, name)`` (``begin`` was skipped,
                a programming error) or it is already completed.
            PrivacyBudgetError: The actual parameters overspend the target. The truth is
                still written first, so the record stays honest; the stage's output must
                not be released.
        """
        index = self._find(mechanism.key)
        if index is None:
            raise RuntimeError(
                f"{mechanism.stage}/{mechanism.name} completed without Ledger.begin; every "
                "mechanism must be recorded before it touches sensitive data"
            )
        if self._entries[index]["status"] == "completed":
            raise RuntimeError(f"{mechanism.stage}/{mechanism.name} is already completed")
        started = self._entries[index]
        self._entries[index] = {
            **mechanism.to_dict(),
            "noise_secret": started.get("noise_secret", False),
            "status": "completed",
            "epsilon_after": None,
            "time": _now(),
            **({"details": started["details"]} if "details" in started else {}),
        }
        self._write(event=("complete", mechanism, {}))
        if not _within_budget(self._epsilon_spent, self.target_epsilon):
            raise PrivacyBudgetError(
                f"{mechanism.describe()} ran beyond what was approved: epsilon is now "
                f"{self._epsilon_spent:.4g} > privacy.target_epsilon={self.target_epsilon:g}; "
                "do not release this run's outputs"
            )

    @property
    def differentially_private(self) -> bool:
        """False once anything touched sensitive data without a DP mechanism."""
        return not self._non_private

    def record_non_private(self, *, stage: str, name: str, description: str) -> None:
        """Record that ``stage`` uses the sensitive data with no privacy guarantee.

        Some synthesizers (BN-statistics synthesis) are not differentially private at all.
        They still belong in the run's one ledger: the file then says, in
        ``differentially_private: false`` and a ``non_private`` entry, that no epsilon
        describes this run's output. Recording the same ``(stage, name)`` again is a no-op.
        """
        self._note(self._non_private, "non_private", stage, name, description)

    def record_measurement(self, *, stage: str, name: str, description: str) -> None:
        """Record a non-private measurement of the sensitive data kept by the data owner.

        Unlike :meth:`record_non_private`, its result is never released (it stays
        outside ``release/``), so it spends no budget and the release stays
        differentially private; it is listed so that the run's one record says
        everything that read the sensitive data. Recording ``(stage, name)`` again is a
        no-op.
        """
        self._note(self._measurements, "measurement", stage, name, description)

    def _note(self, into: list, event: str, stage: str, name: str, description: str) -> None:
        """Append a described use of the data to ``into`` and the journal, once per key."""
        if any((e["stage"], e["name"]) == (stage, name) for e in into):
            return
        entry = {"stage": stage, "name": name, "description": description, "time": _now()}
        into.append(entry)
        self._events.append({"event": event, **entry})
        self._write()

    @property
    def measurements(self) -> list[dict[str, Any]]:
        """Non-private measurements for the data owner (see :meth:`record_measurement`)."""
        return [dict(e) for e in self._measurements]

    @property
    def events(self) -> list[dict[str, Any]]:
        """The append-only journal: every begin, resume, restart and completion."""
        return [dict(e) for e in self._events]

    def explain_over_budget(self, exc: PrivacyBudgetError, *, stage: str) -> PrivacyBudgetError:
        """``exc``, or, when ``stage`` abandoned attempts that are still charged, the error
        that says so: a restart that cannot fit beside them needs a new run directory."""
        abandoned = [
            e for e in self._events if e.get("abandoned_attempt") and e.get("stage") == stage
        ]
        if not abandoned:
            return exc
        return PrivacyBudgetError(
            f"{len(abandoned)} earlier {stage} attempt(s) drew secret noise and were restarted "
            f"without their checkpoint, so each is charged in full ({self.path}) and what is "
            f"left of privacy.target_epsilon={self.target_epsilon:g} is too little ({exc}); "
            "start a new run directory"
        )

    def _write(self, event: tuple[str, Mechanism, dict[str, Any]] | None = None) -> None:
        history = self.history
        for i, entry in enumerate(self._entries):
            entry["epsilon_after"] = self._history_epsilon(history[: i + 1])
        self._epsilon_spent = self._history_epsilon(history)
        if event is not None:
            name, mechanism, extra = event
            self._events.append(
                {
                    "event": name,
                    **mechanism.to_dict(),
                    **extra,
                    "epsilon_spent": self._epsilon_spent,
                    "time": _now(),
                }
            )
        data = {
            "accountant": self.accountant,
            "delta": self.delta,
            "target_epsilon": self.target_epsilon,
            "epsilon_spent": self._epsilon_spent,
            "noise_secret": self.noise_secret,
            "differentially_private": not self._non_private,
            "mechanisms": self._entries,
            "non_private": self._non_private,
            "measurements": self._measurements,
            "events": self._events,
        }
        # One atomic, fsynced write (privimage.io.atomic): readers, and a crash, see the
        # old ledger or the new one, never a torn one.
        write_text(self.path, json.dumps(data, indent=2) + "\n")


def run_ledger(cfg: Config, run_dir: Path) -> Ledger:
    """The run's one privacy ledger (``privacy.json``) under the run's budget and accountant."""
    return Ledger(
        Path(run_dir) / LEDGER,
        target_epsilon=cfg.privacy.target_epsilon,
        delta=cfg.privacy.delta,
        accountant=cfg.privacy.accountant,
    )
