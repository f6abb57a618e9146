"""Word stems and sentence splitting shared by the deterministic context builders.

Matching is by crude stems (suffix stripped, first six letters) so that "cancel", "cancelled" and
"cancellation" meet without a language model. Stop words carry no signal and are dropped.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence, Set
from functools import lru_cache

_WORD = re.compile(r"[a-z0-9]+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(\[])")
_SUFFIXES = ("ing", "ed", "es", "s", "e")

STOP_WORDS = frozenset(
    [
        "a",
        "an",
        "the",
        "and",
        "or",
        "but",
        "if",
        "then",
        "than",
        "that",
        "this",
        "these",
        "those",
        "there",
        "their",
        "them",
        "they",
        "it",
        "its",
        "is",
        "are",
        "was",
        "were",
        "be",
        "been",
        "being",
        "am",
        "do",
        "does",
        "did",
        "done",
        "have",
        "has",
        "had",
        "having",
        "i",
        "me",
        "my",
        "we",
        "our",
        "you",
        "your",
        "he",
        "she",
        "his",
        "her",
        "to",
        "of",
        "in",
        "on",
        "at",
        "by",
        "for",
        "with",
        "from",
        "as",
        "into",
        "about",
        "over",
        "under",
        "up",
        "down",
        "out",
        "off",
        "so",
        "not",
        "no",
        "yes",
        "can",
        "could",
        "would",
        "should",
        "will",
        "shall",
        "may",
        "might",
        "must",
        "just",
        "also",
        "any",
        "all",
        "some",
        "each",
        "every",
        "other",
        "only",
        "own",
        "same",
        "too",
        "very",
        "what",
        "which",
        "who",
        "whom",
        "whose",
        "when",
        "where",
        "why",
        "how",
        "please",
        "thank",
        "thanks",
        "hi",
        "hello",
        "okay",
        "ok",
        "sure",
        "get",
        "like",
        "want",
        "need",
        "let",
        "know",
        "one",
        "two",
    ]
)


@lru_cache(maxsize=65536)  # a pure function of one word; vocabularies are small
def stem(word: str) -> str:
    for suffix in _SUFFIXES:
        if len(word) > len(suffix) + 2 and word.endswith(suffix):
            word = word[: -len(suffix)]
            break
    return word[:6]


def stems(text: str) -> set[str]:
    """Content-word stems of ``text``; snake_case and camelCase names are split into words."""
    text = re.sub(r"([a-z])([A-Z])", r"\1 \2", text).replace("_", " ").lower()
    return {stem(w) for w in _WORD.findall(text) if w not in STOP_WORDS and len(w) > 1}


@lru_cache(maxsize=8192)  # conversations resend the same messages every turn
def frozen_stems(text: str) -> frozenset[str]:
    return frozenset(stems(text))


def sentences(text: str) -> list[str]:
    """Lines and sentences of a prose or Markdown text, bullets stripped, empty pieces dropped."""
    out: list[str] = []
    for line in text.splitlines():
        line = line.strip().lstrip("-*•").strip()
        if not line:
            continue
        out.extend(piece.strip() for piece in _SENTENCE_END.split(line) if piece.strip())
    return out


def idf(documents: Sequence[Set[str]]) -> dict[str, float]:
    """Inverse document frequency: stems shared by every document weigh little."""
    df: dict[str, int] = {}
    for doc in documents:
        for s in doc:
            df[s] = df.get(s, 0) + 1
    n = len(documents)
    return {s: math.log((n + 1) / (count + 0.5)) for s, count in df.items()}


def overlap_score(query: Set[str], doc: Set[str], weights: dict[str, float]) -> float:
    return sum(weights.get(s, 0.0) for s in query & doc)


def clip(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"
