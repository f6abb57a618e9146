"""PromQL helpers for the tests: the metric names an expression reads."""

from __future__ import annotations

from typing import Any

import promql_parser


def metric_names(expr: str) -> set[str]:
    """Every metric name selected anywhere in ``expr`` (raises ValueError if it does not parse)."""
    names: set[str] = set()
    _walk(promql_parser.parse(expr), names)
    return names


def _walk(node: Any, names: set[str]) -> None:
    if isinstance(node, promql_parser.VectorSelector):
        if node.name:
            names.add(node.name)
        return
    if isinstance(node, promql_parser.MatrixSelector):
        _walk(node.vector_selector, names)
        return
    if isinstance(node, promql_parser.Call):
        for arg in node.args:
            _walk(arg, names)
        return
    if isinstance(node, promql_parser.BinaryExpr):
        _walk(node.lhs, names)
        _walk(node.rhs, names)
        return
    if isinstance(node, promql_parser.AggregateExpr):
        _walk(node.expr, names)
        if node.param is not None:
            _walk(node.param, names)
        return
    if isinstance(node, promql_parser.ParenExpr | promql_parser.UnaryExpr | promql_parser.SubqueryExpr):
        _walk(node.expr, names)
