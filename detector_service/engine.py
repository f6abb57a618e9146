"""The detector engine: runs the enabled detectors over one turn and folds findings into a verdict.

The same engine serves the Redis worker, the proxy's embedded mode and ``fama replay``.
Contract: ``Engine(profile).evaluate(turn) -> Verdict`` is pure (no I/O) and thread-safe: it keeps no
state between calls besides caches of compiled schemas, of resolved tool kinds per tools array, and of
each recent session's conversation index. A session's next turn repeats the conversation and adds a few
messages, so its index is extended with those instead of built again (DESIGN §8: cost linear in the
conversation, not quadratic over a session). The cached index is reused only when the new turn's
messages start with exactly the messages it was built from (same JSON bytes) under the same tool kinds;
anything else builds from scratch, so the result is always the one a full build gives.

With a ``monitor:`` in the profile, the session's monitor features (``detector_service.monitor``) are kept and
extended the same way, and each verdict carries the turn's risk; ``stakes.apply_risk`` decides what it changes.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from detector_service import stakes
from detector_service.contract.active_profile import ActiveProfile, ProfileHolder
from detector_service.contract.profile import Dialect, Profile
from detector_service.contract.textactions import known_names, native_turn
from detector_service.contract.toolkinds import ToolKinds
from detector_service.contract.wire import ACTION_STRENGTH, Action, Category, Finding, TurnEvent, Verdict
from detector_service.detectors import dcv, ifu, loop, mtc, rules, wrco
from detector_service.monitor import features as monitor_features
from detector_service.monitor.model import unusable
from detector_service.monitor.score import Risk, score
from detector_service.turn import ConversationIndex, TurnView, tool_calls_of, tools_by_name

DETECTOR_VERSION = "0.2.0"
MAX_TOOL_SETS = 256  # distinct tools arrays whose resolved kinds are kept
MAX_CACHED_INDEXES = 1024  # sessions whose latest conversation index is kept for their next turn
RECENT_PROFILES = 3  # profiles whose engines are kept for turns that started under them

Detector = Callable[[TurnView], list[Finding]]

DETECTORS: dict[str, Detector] = {
    "mtc": mtc.detect,
    "dcv": dcv.detect,
    "rules": rules.detect,
    "wrco": wrco.detect,
    "ifu": ifu.detect,
    "loop": loop.detect,
}


@dataclass(frozen=True, slots=True)
class _Cached:
    index: ConversationIndex
    digest: bytes  # of the messages the index was built from
    features: monitor_features.FeatureState | None  # the monitor's, over the same messages


def _digests(messages: list[dict[str, Any]], at: int) -> tuple[bytes, bytes] | None:
    """Digests of ``messages[:at]`` and of all ``messages``, in one pass; None when they are not JSON."""
    h = hashlib.blake2b(digest_size=16)
    prefix = h.digest()
    try:
        for i, m in enumerate(messages):
            if i == at:
                prefix = h.digest()
            h.update(orjson.dumps(m))
            h.update(b"\x1e")  # record separator: message boundaries are part of what is compared
    except TypeError:
        return None
    full = h.digest()
    return (full if at >= len(messages) else prefix), full


class Engine:
    def __init__(self, profile: Profile | None = None) -> None:
        self.profile = profile or Profile()
        self._detectors = [fn for name, fn in DETECTORS.items() if self.profile.detector_enabled(name)]
        self._kinds: dict[bytes, ToolKinds] = {}
        # A session's index is taken out while a turn uses it and put back after: a concurrent turn of the
        # same session (another thread) builds its own instead of sharing one being extended.
        self._indexes: OrderedDict[tuple[str, str], _Cached] = OrderedDict()
        self._indexes_lock = threading.Lock()
        monitor = self.profile.monitor
        self.monitor = monitor if monitor is not None and unusable(monitor) is None else None

    def index(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> ConversationIndex:
        """An index of ``messages``; extend it with ``add`` to follow a conversation incrementally."""
        return ConversationIndex.build(messages, self.kinds(tools))

    def kinds(self, tools: list[dict[str, Any]]) -> ToolKinds:
        """The kinds of a tools array, resolved once per distinct array: every turn of a deployment sends the same."""
        try:
            # By content, not identity: each turn arrives as its own parsed copy of the array.
            key = orjson.dumps(tools)
        except TypeError:  # not JSON (a caller's own objects): resolve without caching
            return ToolKinds(self.profile, tools)
        found = self._kinds.get(key)
        if found is None:
            if len(self._kinds) >= MAX_TOOL_SETS:
                self._kinds.pop(next(iter(self._kinds)))  # oldest first
            found = self._kinds[key] = ToolKinds(self.profile, tools)
        return found

    def view(
        self, index: ConversationIndex, candidate: Mapping[str, Any], tools: Mapping[str, Mapping[str, Any]]
    ) -> TurnView:
        return TurnView.of(index, candidate, tools, self.profile)

    def native(self, turn: TurnEvent) -> tuple[Dialect, TurnEvent]:
        """The turn as the detectors read it: actions the harness wrote as text become native calls and tool
        messages (:func:`detector_service.contract.textactions.native_turn`; the profile's ``dialect``), and the
        dialect it was written in. A native turn is returned as it is."""
        names = known_names(tools_by_name(turn.tools).keys(), self.profile)
        dialect, messages, candidate = native_turn(self.profile.dialect, turn.messages, turn.candidate, names)
        if not dialect.text_actions:
            return dialect, turn
        return dialect, turn.model_copy(update={"messages": messages, "candidate": candidate})

    def findings(self, turn: TurnEvent) -> list[Finding]:
        dialect, native = self.native(turn)
        return self.findings_for(self._scan(native, dialect.text_actions)[0])

    def _scan(self, turn: TurnEvent, text_actions: bool) -> tuple[TurnView, monitor_features.FeatureState | None]:
        """The view of a native-shaped turn (see ``native``) and the session's monitor features (None without a
        monitor), both kept for its next turn."""
        key = (turn.tenant, turn.session_id)
        index, state, digest = self._session_index(key, turn.messages, self.kinds(turn.tools), text_actions)
        view = self.view(index, turn.candidate, tools_by_name(turn.tools))
        if digest is not None:
            with self._indexes_lock:
                self._indexes[key] = _Cached(index, digest, state)
                self._indexes.move_to_end(key)
                while len(self._indexes) > MAX_CACHED_INDEXES:
                    self._indexes.popitem(last=False)  # least recently used first
        return view, state

    def _session_index(
        self, key: tuple[str, str], messages: list[dict[str, Any]], kinds: ToolKinds, text_actions: bool
    ) -> tuple[ConversationIndex, monitor_features.FeatureState | None, bytes | None]:
        """The index of ``messages`` (extended from the session's previous one when that is a prefix of
        them), the monitor's features over the same messages, and the digest to cache them under (None: not
        cacheable)."""
        with self._indexes_lock:
            cached = self._indexes.pop(key, None)
        at = cached.index.size if cached is not None else 0
        digests = _digests(messages, at)
        if digests is not None and cached is not None:
            prefix, full = digests
            fresh = self.monitor is not None and cached.features is None
            if (
                cached.index.kinds is kinds
                and cached.index.text_actions == text_actions
                and at <= len(messages)
                and cached.digest == prefix
                and not fresh
            ):
                index, state = cached.index, cached.features
                for m in messages[at:]:
                    index.add(m)
                    if state is not None:
                        state.add(m)
                return index, state, full
        index = ConversationIndex.build(messages, kinds, text_actions=text_actions)
        state = monitor_features.FeatureState.build(messages, kinds) if self.monitor is not None else None
        return index, state, None if digests is None else digests[1]

    def risk(self, view: TurnView, state: monitor_features.FeatureState | None) -> Risk | None:
        """The monitor's risk for the view's candidate turn (None without a monitor)."""
        if self.monitor is None or state is None:
            return None
        x = monitor_features.vector(state, view.index, view.calls)
        calls = [c.name for c in view.calls]
        return score(self.monitor, x, calls, view.index.kinds.declared, monitor_features.dialect_of(view.index))

    def findings_for(self, view: TurnView) -> list[Finding]:
        out: list[Finding] = []
        for detect in self._detectors:
            out.extend(detect(view))
        return out

    def decide(
        self,
        candidate: Mapping[str, Any],
        found: list[Finding],
        kinds: ToolKinds | None = None,
        risk: Risk | None = None,
        attempt: int = 0,
    ) -> tuple[Action, dict[str, Any] | None]:
        """The strongest action the findings ask for (each set on its finding from the decision table in
        ``stakes``, raised by the monitor's ``risk`` where ``stakes.apply_risk`` says so; a ``monitor_risk``
        finding may be appended to ``found``), and the repaired candidate when only repairs were found."""
        kinds = kinds or ToolKinds(self.profile)
        calls = [
            {"id": c.get("id"), "name": (c.get("function") or {}).get("name")}
            for c in tool_calls_of(candidate)
            if isinstance(c.get("function") or {}, Mapping)
        ]
        action = Action.PASS
        repairs = {
            f.tool_call_id: f.evidence["repaired_arguments"] for f in found if "repaired_arguments" in f.evidence
        }
        for f in found:
            f.action = stakes.action_for(self.profile, f, stakes.stakes_of(f, calls, kinds))
        stakes.apply_risk(found, calls, kinds, risk, attempt, self.profile.max_retries)
        for f in found:
            if f.action is not None and ACTION_STRENGTH[f.action] > ACTION_STRENGTH[action]:
                action = f.action
        rewritten = _rewrite(candidate, repairs) if repairs else None
        return action, rewritten

    def evaluate(self, turn: TurnEvent) -> Verdict:
        start = time.perf_counter()
        dialect, native = self.native(turn)
        view, state = self._scan(native, dialect.text_actions)
        found = self.findings_for(view)
        risk = self.risk(view, state)
        action, rewritten = self.decide(native.candidate, found, view.index.kinds, risk, turn.attempt)
        if dialect.text_actions:
            rewritten = None  # a repaired native call is no answer for a harness that reads text: retried instead
        return Verdict(
            turn_id=turn.turn_id,
            session_id=turn.session_id,
            tenant=turn.tenant,
            action=action,
            findings=found,
            rewritten=rewritten,
            detector_version=DETECTOR_VERSION,
            elapsed_ms=(time.perf_counter() - start) * 1000,
            risk=None if risk is None else risk.value,
            risk_features=[] if risk is None else list(risk.top),
            risk_acting=risk is not None and risk.acting and turn.attempt == 0 and self.profile.max_retries > 0,
        )


class Engines:
    """The engine of each recent profile of a :class:`ProfileHolder`, built once per profile on its swap.

    A turn names the hash of the profile its proxy judged it under (``TurnEvent.profile_sha256``); it is evaluated
    with that profile while this process still holds it (the current one or the ones just before), so a turn
    under way when the profile changes finishes under the profile it started with. Any other turn gets the
    current profile's engine.
    """

    def __init__(self, profiles: ProfileHolder, first: Engine | None = None) -> None:
        self._by_hash: OrderedDict[str, Engine] = OrderedDict()
        self._first = first  # an engine built by the caller, for the holder's first profile
        profiles.listen(self._swapped)

    @classmethod
    def fixed(cls, engine: Engine) -> Engines:
        """One engine for every turn (a process whose profile never changes)."""
        return cls(ProfileHolder.of(engine.profile), engine)

    def _swapped(self, old: ActiveProfile, new: ActiveProfile) -> None:
        if new.sha256 not in self._by_hash:
            first, self._first = self._first, None
            self._by_hash[new.sha256] = first if first is not None else Engine(new.profile)
        self._by_hash.move_to_end(new.sha256)
        while len(self._by_hash) > RECENT_PROFILES:
            self._by_hash.popitem(last=False)

    @property
    def current(self) -> Engine:
        return next(reversed(self._by_hash.values()))

    def of(self, turn: TurnEvent) -> Engine:
        found = self._by_hash.get(turn.profile_sha256) if turn.profile_sha256 is not None else None
        return found if found is not None else self.current


def merge(
    engine: Engine,
    verdict: Verdict,
    candidate: Mapping[str, Any],
    extra: list[Finding],
    tools: list[dict[str, Any]] | None = None,
) -> Verdict:
    """The verdict with more findings (e.g. the LLM judge's) folded in; the action is recomputed."""
    if not extra:
        return verdict
    # The monitor's own finding is decided again with the rest (the extra findings may already act).
    found = [*(f for f in verdict.findings if f.detector != stakes.MONITOR_DETECTOR), *extra]
    risk = None
    if verdict.risk is not None and verdict.risk_acting:
        risk = Risk(verdict.risk, verdict.risk, True, tuple(verdict.risk_features))
    action, rewritten = engine.decide(candidate, found, engine.kinds(tools) if tools is not None else None, risk)
    return verdict.model_copy(update={"findings": found, "action": action, "rewritten": rewritten})


def _rewrite(candidate: Mapping[str, Any], repairs: Mapping[str | None, str]) -> dict[str, Any]:
    out = orjson.loads(orjson.dumps(candidate))
    for call in tool_calls_of(out):
        fixed = repairs.get(call.get("id"))
        if fixed is not None and isinstance(call.get("function"), dict):
            call["function"]["arguments"] = fixed
    return dict(out)


__all__ = ["DETECTORS", "DETECTOR_VERSION", "Category", "Engine", "Engines", "merge"]
