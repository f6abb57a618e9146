"""The LLM judge of the profile in force: a pushed profile whose ``judge:`` section differs gets a judge of its own.

A :class:`Judges` listens to the process's :class:`~detector_service.contract.active_profile.ProfileHolder`. On a
swap that changes the ``judge`` section it builds the new judge (none when the section disables it) and keeps the
one before until the process stops, so a call already under way finishes on the client it started with; a swap
that leaves the section as it was keeps the judge, its client and its cache. Every unit of work reads
:attr:`Judges.current` once. A section that cannot build a judge (no model named) leaves the turns to the
deterministic verdict and says why in the log.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from pydantic import SecretStr

from detector_service.contract.active_profile import ActiveProfile, ProfileHolder
from detector_service.contract.profile import JudgeConfig, Profile
from detector_service.contract.redaction import redact_also
from detector_service.llm.judge import Judge, judge_key, make_client

log = logging.getLogger(__name__)

Build = Callable[[JudgeConfig], "Judge | None"]


def judge_builder(api_key: SecretStr | None) -> Build:
    """Builds the judge a profile section asks for, its key from ``FAMA_JUDGE_API_KEY`` or the variable the section
    names (taught to the log redactors first)."""

    def build(config: JudgeConfig) -> Judge | None:
        if not config.enabled:
            return None
        key = judge_key(api_key, config)
        redact_also(key)
        return Judge(config, make_client(config, key))

    return build


class Judges:
    """The judge of each profile the holder puts in force."""

    def __init__(self, profiles: ProfileHolder, build: Build) -> None:
        self._build = build
        self._config: JudgeConfig | None = None
        self._current: Judge | None = None
        self._retired: list[Judge] = []
        profiles.listen(self._swapped)

    @classmethod
    def fixed(cls, judge: Judge | None) -> Judges:
        """One judge (or none) for every turn (a process whose profile never changes)."""
        config = judge.config if judge is not None else JudgeConfig()
        return cls(ProfileHolder.of(Profile(judge=config)), lambda _config: judge)

    def _swapped(self, old: ActiveProfile, new: ActiveProfile) -> None:
        config = new.profile.judge
        if config == self._config:
            return
        first = self._config is None
        self._config = config
        if self._current is not None:
            self._retired.append(self._current)
        try:
            self._current = self._build(config)
        except ValueError as exc:  # e.g. enabled without a model: the deterministic verdict stands
            self._current = None
            log.error("the judge of profile version %d cannot be built (%s): turns go without it", new.version, exc)
            return
        if not first:
            state = f"model {config.model} at {config.base_url}" if self._current is not None else "off"
            log.info("judge of profile version %d: %s", new.version, state)

    @property
    def current(self) -> Judge | None:
        return self._current

    async def aclose(self) -> None:
        judges = [*self._retired, *([self._current] if self._current is not None else [])]
        self._retired, self._current = [], None
        for judge in judges:
            await judge.aclose()
