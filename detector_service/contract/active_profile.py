"""The profile in force in a process, and the one holder that swaps it.

A process starts with the profile of its file (``--profile`` / ``FAMA_PROFILE``): version 0, source ``file``.
Each ``POST /admin/profile`` (``fama profile push``) makes a new version, numbered by the store (Redis) or, with
no Redis, by the process itself: version n >= 1, source ``pushed``. A pushed profile is newer than any file, so
a process that starts while a pushed profile is stored takes the stored one (see
:mod:`detector_service.bus.profiles`).

Every reader takes :attr:`ProfileHolder.current` once per unit of work (a turn, a batch) and keeps that
snapshot to its end: a turn in flight finishes under the profile it started with, the next one gets the new
one. :meth:`ProfileHolder.offer` is the only place a profile is swapped; listeners (metrics, derived engines, the
judge and the policy-extraction scheduler, :mod:`detector_service.llm.follows`) hear of each swap.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from detector_service.contract.profile import Profile, profile_document, profile_sha256
from detector_service.contract.wire import now_ms

log = logging.getLogger(__name__)

Source = Literal["file", "pushed"]
Listener = Callable[["ActiveProfile", "ActiveProfile"], None]  # (old, new)


@dataclass(frozen=True, slots=True)
class ActiveProfile:
    profile: Profile
    version: int = 0
    source: Source = "file"
    pushed_ms: int | None = None  # when it was pushed (epoch ms); None for a file
    sha256: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha256", profile_sha256(self.profile))

    @property
    def short_hash(self) -> str:
        """The hash as a metric label: 12 hex digits tell profiles apart."""
        return self.sha256[:12]

    def document(self) -> bytes:
        return profile_document(self.profile)

    def describe(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "sha256": self.sha256,
            "source": self.source,
            "pushed_ms": self.pushed_ms,
            "name": self.profile.name,
            "profile": self.profile.model_dump(mode="json"),
        }


class ProfileHolder:
    """The current :class:`ActiveProfile` of a process."""

    def __init__(self, first: ActiveProfile) -> None:
        self._current = first
        self.since_ms = now_ms()  # when the current profile came into force in this process
        self._listeners: list[Listener] = []

    @classmethod
    def of(cls, profile: Profile) -> ProfileHolder:
        return cls(ActiveProfile(profile))

    @property
    def current(self) -> ActiveProfile:
        return self._current

    def listen(self, listener: Listener) -> None:
        """Call ``listener(old, new)`` on every swap (and once now, from the current profile to itself)."""
        self._listeners.append(listener)
        listener(self._current, self._current)

    def offer(self, new: ActiveProfile, *, newer_only: bool = True) -> bool:
        """Swap to ``new`` when its version is newer (or, with ``newer_only=False``, when it is another version or
        another profile: the store's profile wins, even after the store was reset). True when it swapped."""
        old = self._current
        if new.version <= old.version if newer_only else (new.version, new.sha256) == (old.version, old.sha256):
            return False
        self._current = new
        self.since_ms = now_ms()
        log.info(
            "profile %s version %d (%s, sha256 %s) replaces version %d (sha256 %s)",
            new.profile.name,
            new.version,
            new.source,
            new.short_hash,
            old.version,
            old.short_hash,
        )
        for listener in self._listeners:
            listener(old, new)
        return True
