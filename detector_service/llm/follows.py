"""What a process builds from sections of the profile in force: the LLM judge, the policy-extraction scheduler.

A :class:`FollowsProfile` listens to the process's :class:`~detector_service.contract.active_profile.ProfileHolder`.
On a swap that changes the sections it is built from, it builds anew (nothing when the sections switch it off) and
keeps the one before until the process stops, so work already under way finishes on what it started with; a swap
that leaves the sections as they were keeps what was built (the judge's client and cache, the scheduler's state).
Every unit of work reads :attr:`FollowsProfile.current` once. Sections that cannot build (a judge enabled without a
model) leave the turns to the deterministic verdict and say why in the log.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Generic, TypeVar

from pydantic import SecretStr

from detector_service.contract.active_profile import ActiveProfile, ProfileHolder
from detector_service.contract.profile import JudgeConfig, Profile
from detector_service.contract.redaction import redact_also
from detector_service.llm.judge import Judge, judge_key, make_client

log = logging.getLogger(__name__)

T = TypeVar("T")
_UNSET = object()


class FollowsProfile(Generic[T]):
    """The thing built from ``section(profile)`` of the profile in force, rebuilt when that section changes."""

    def __init__(
        self,
        profiles: ProfileHolder,
        section: Callable[[Profile], object],
        build: Callable[[Profile], T | None],
        what: str,
    ) -> None:
        self._section = section
        self._build = build
        self._what = what
        self._key: object = _UNSET  # no profile seen yet
        self._current: T | None = None
        self._retired: list[T] = []
        profiles.listen(self._swapped)

    @staticmethod
    def holding(value: T | FollowsProfile[T] | None, what: str = "part") -> FollowsProfile[T]:
        """``value`` as a holder: itself, or one value (or none) for every turn whatever the profile."""
        if isinstance(value, FollowsProfile):
            return value
        return FollowsProfile(ProfileHolder.of(Profile()), lambda _p: None, lambda _p: value, what)

    def _swapped(self, old: ActiveProfile, new: ActiveProfile) -> None:
        key = self._section(new.profile)
        if key == self._key:
            return
        first = self._key is _UNSET
        self._key = key
        if self._current is not None:
            self._retired.append(self._current)
        try:
            self._current = self._build(new.profile)
        except ValueError as exc:  # e.g. a judge enabled without a model: the deterministic verdict stands
            self._current = None
            log.error(
                "the %s of profile version %d cannot be built (%s): turns go without it", self._what, new.version, exc
            )
            return
        if not first:
            log.info("%s of profile version %d: %s", self._what, new.version, "on" if self._current else "off")

    @property
    def current(self) -> T | None:
        return self._current

    def drain(self) -> list[T]:
        """Everything built so far, the current one last; the holder keeps none of it (to close at shutdown)."""
        out = [*self._retired, *([self._current] if self._current is not None else [])]
        self._retired, self._current = [], None
        return out


def judge_builder(api_key: SecretStr | None) -> Callable[[JudgeConfig], Judge | None]:
    """Builds the judge a profile section asks for, its key from ``FAMA_JUDGE_API_KEY`` or the variable the section
    names (taught to the log redactors first)."""

    def build(config: JudgeConfig) -> Judge | None:
        if not config.enabled:
            return None
        key = judge_key(api_key, config)
        redact_also(key)
        return Judge(config, make_client(config, key))

    return build


class Judges(FollowsProfile[Judge]):
    """The LLM judge of the profile in force (its ``judge:`` section)."""

    def __init__(self, profiles: ProfileHolder, build: Callable[[JudgeConfig], Judge | None]) -> None:
        super().__init__(profiles, lambda p: p.judge, lambda p: build(p.judge), "judge")

    @classmethod
    def of(cls, judge: Judge | Judges | None) -> Judges:
        """``judge`` as a holder: itself, or one judge (or none) for every turn whatever the profile."""
        if isinstance(judge, Judges):
            return judge
        config = judge.config if judge is not None else JudgeConfig()
        return cls(ProfileHolder.of(Profile(judge=config)), lambda _config: judge)

    async def aclose(self) -> None:
        for judge in self.drain():
            await judge.aclose()
