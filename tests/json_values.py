"""Hypothesis strategies for the property tests: any JSON value, and "usually the right type"."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.text(max_size=8))
anything = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def mostly(valid: st.SearchStrategy[Any], one_in: int) -> st.SearchStrategy[Any]:
    """``valid``, except once in ``one_in`` draws any JSON value (the wrong type, most of the time)."""
    return st.integers(1, one_in).flatmap(lambda k: anything if k == 1 else valid)
