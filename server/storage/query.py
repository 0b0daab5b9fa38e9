"""The generic list layer in SQL: filters, ordering and keyset pages for any table.

A repository gives the columns that its filter and order fields map to; these functions
do the rest, the same way for every resource.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.sql.elements import ColumnElement

from server.domain.common.listing import And, Compare, Expr, ListQuery, Or

Columns = Mapping[str, sa.ColumnElement[Any]]


def _escape_like(value: str) -> str:
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _compare(column: sa.ColumnElement[Any], node: Compare) -> ColumnElement[bool]:
    value = node.value
    if isinstance(value, str) and node.op == ":":
        return column.ilike(f"%{_escape_like(value)}%", escape="\\")
    if isinstance(value, str) and node.op in {"=", "!="} and "*" in value:
        pattern = "%".join(_escape_like(part) for part in value.split("*"))
        matched = column.ilike(pattern, escape="\\")
        return matched if node.op == "=" else sa.not_(matched)
    ops = {
        "=": column.__eq__,
        "!=": column.__ne__,
        "<": column.__lt__,
        "<=": column.__le__,
        ">": column.__gt__,
        ">=": column.__ge__,
    }
    return ops[node.op](value)


def compile_filter(expr: Expr, columns: Columns) -> ColumnElement[bool]:
    """The SQL condition for a parsed filter; every field was validated against the spec."""
    if isinstance(expr, Compare):
        return _compare(columns[expr.field], expr)
    if isinstance(expr, And):
        return sa.and_(*(compile_filter(item, columns) for item in expr.items))
    if isinstance(expr, Or):
        return sa.or_(*(compile_filter(item, columns) for item in expr.items))
    return sa.not_(compile_filter(expr.item, columns))


def apply_list_query(
    stmt: sa.Select[Any], query: ListQuery, columns: Columns, id_column: sa.ColumnElement[Any]
) -> sa.Select[Any]:
    """Add the filter, the keyset condition, the order and ``limit + 1`` to ``stmt``."""
    if query.filter is not None:
        stmt = stmt.where(compile_filter(query.filter, columns))
    keys = [(columns[k.field], k.descending) for k in query.order] + [(id_column, False)]
    if query.after is not None:
        stmt = stmt.where(_after(keys, query.after))
    order = [col.desc() if desc else col.asc() for col, desc in keys]
    return stmt.order_by(*order).limit(query.limit + 1)


def _after(keys: list[tuple[sa.ColumnElement[Any], bool]], values: tuple[Any, ...]) -> Any:
    """Rows strictly after ``values`` in the order ``keys`` (mixed directions allowed):
    (a > x) OR (a = x AND b > y) OR (a = x AND b = y AND id > z)."""
    clauses = []
    for i, (column, descending) in enumerate(keys):
        equal = [keys[j][0] == values[j] for j in range(i)]
        beyond = column < values[i] if descending else column > values[i]
        clauses.append(sa.and_(*equal, beyond))
    return sa.or_(*clauses)
