"""DCE, the domain constraints extractor: the policy sentences that apply to the pending action.

The policy (system message, else the profile's ``policy``) is split into sentences once per distinct
text and cached by its SHA-256, so a long policy is indexed once per deployment, not once per turn.
Each sentence is scored by the weighted overlap of its stems (and its section heading's) with the
pending tools' names and the latest user request; rare words weigh more than common ones.

When the detector service has extracted the policy's rules with an LLM (:mod:`detector_service.llm.extraction`)
and the caller passes that extraction, the rules tagged with a pending tool, then those whose words
overlap the request, are used instead of raw sentences.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from detector_service.agents import text as t
from detector_service.agents.note import AgentInput, Note
from detector_service.agents.view import policy_text
from detector_service.contract.extraction import PolicyExtraction, policy_hash
from detector_service.contract.profile import AgentName, ToolKind

__all__ = ["PolicyCache", "build", "policy_hash", "policy_text"]

MAX_SENTENCES = 6
# What any state-changing action is subject to, whatever the domain calls it.
_WRITE_QUERY = "confirm confirmation update change modify action"
_CONSTRAINT_WORDS = {t.stem(w) for w in ("must", "only", "never", "cannot", "not", "before", "confirm", "allowed")}


@dataclass(frozen=True)
class PolicyIndex:
    sentences: tuple[str, ...]
    stems: tuple[frozenset[str], ...]  # the sentence's stems plus its section heading's
    weights: dict[str, float]
    constraining: tuple[bool, ...]  # says must / only / never ...


def index_policy(policy: str) -> PolicyIndex:
    kept: list[str] = []
    kept_stems: list[frozenset[str]] = []
    constraining: list[bool] = []
    heading: set[str] = set()
    for line in policy.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (stripped.startswith("<") and stripped.endswith(">")):
            heading = t.stems(stripped.strip("#<>/ "))
            continue
        for sentence in t.sentences(stripped):
            own = t.stems(sentence)
            if len(own) < 2:
                continue
            kept.append(sentence)
            kept_stems.append(frozenset(own | heading))
            raw_words = {t.stem(w) for w in sentence.lower().replace("'", " ").split()}
            constraining.append(bool(raw_words & _CONSTRAINT_WORDS))
    return PolicyIndex(tuple(kept), tuple(kept_stems), t.idf(kept_stems), tuple(constraining))


class PolicyCache:
    """Bounded LRU of policy indexes keyed by the policy text's hash."""

    def __init__(self, max_entries: int = 64) -> None:
        self._max = max_entries
        self._entries: OrderedDict[str, PolicyIndex] = OrderedDict()

    def get(self, policy: str) -> PolicyIndex:
        key = policy_hash(policy)
        found = self._entries.get(key)
        if found is None:
            found = index_policy(policy)
            self._entries[key] = found
            if len(self._entries) > self._max:
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(key)
        return found

    def __len__(self) -> int:
        return len(self._entries)


def relevant_sentences(index: PolicyIndex, query: set[str], limit: int = MAX_SENTENCES) -> list[str]:
    scored = []
    for i, doc in enumerate(index.stems):
        score = t.overlap_score(query, doc, index.weights)
        if score <= 0:
            continue
        if index.constraining[i]:
            score *= 1.5  # rules matter more than descriptions
        scored.append((score, i))
    best = sorted(scored, key=lambda p: (-p[0], p[1]))[:limit]
    return [index.sentences[i] for _, i in sorted(best, key=lambda p: p[1])]  # keep the policy's own order


TOOL_MATCH_BONUS = 100.0  # a rule tagged with a pending tool outranks any word overlap


def relevant_rules(extraction: PolicyExtraction, query: set[str], pending: Sequence[str]) -> list[str]:
    documents = [t.stems(r.rule) | {s for name in r.tools for s in t.stems(name)} for r in extraction.rules]
    weights = t.idf(documents)
    tagged = set(pending)
    scored = []
    for i, (rule, doc) in enumerate(zip(extraction.rules, documents, strict=True)):
        score = t.overlap_score(query, doc, weights) + (TOOL_MATCH_BONUS if tagged.intersection(rule.tools) else 0.0)
        if score > 0:
            scored.append((score, i))
    best = sorted(scored, key=lambda p: (-p[0], p[1]))[:MAX_SENTENCES]
    return [extraction.rules[i].rule for _, i in sorted(best, key=lambda p: p[1])]


def build(inp: AgentInput, cache: PolicyCache, extraction: PolicyExtraction | None = None) -> Note | None:
    policy = inp.view.system_text
    if not policy.strip():
        return None
    query = t.stems(inp.view.latest_user)
    for name in inp.pending_tools:
        query |= t.stems(name)
        if inp.view.kind_of(name) is ToolKind.WRITE:
            query |= t.stems(_WRITE_QUERY)
    found: list[str] = []
    if extraction is not None and extraction.policy_hash == policy_hash(policy):
        found = relevant_rules(extraction, query, inp.pending_tools)
    if not found:
        found = relevant_sentences(cache.get(policy), query)
    if not found:
        return None
    return Note(AgentName.DCE, "Policy rules that apply now", tuple(t.clip(s, 300) for s in found), priority=50)
