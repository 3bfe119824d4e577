"""Cursor pagination as OpenAI does it: `after=<id>` of the last item seen, `limit`, `has_more`.

Rows are ordered by their integer `seq`; the cursor id is looked up (within the same scope as
the list, so another tenant's id is not a valid cursor) and the page continues past its `seq`.
"""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy import Select
from sqlalchemy.orm import Session

from api.errors import bad_request

T = TypeVar("T")


def paginate(session: Session, stmt: Select[Any], model: Any, after: str | None, limit: int,
             newest_first: bool = True, order_col: Any = None) -> tuple[list[Any], bool]:
    """Run `stmt` (already scoped to the tenant) one page at a time.

    Args:
        session: database session.
        stmt: a `select(model)` with its scoping filters.
        model: the ORM class (with `id` and `seq`).
        after: id of the last object of the previous page, or None.
        limit: page size.
        newest_first: order by seq descending (OpenAI's order for jobs, events, checkpoints).
        order_col: column to order by instead of `seq` (must be unique with seq as tiebreak).

    Returns:
        (rows, has_more).

    Raises:
        APIError: 400 when `after` is not an object of this list.
    """
    col = order_col if order_col is not None else model.seq
    if after:
        cursor = session.execute(stmt.with_only_columns(col, model.seq).where(model.id == after)).first()
        if cursor is None:
            raise bad_request(f"Invalid 'after': no object with id {after!r} in this list.", param="after",
                              code="invalid_cursor")
        cval, cseq = cursor
        if order_col is None:
            stmt = stmt.where(model.seq < cseq if newest_first else model.seq > cseq)
        elif newest_first:
            stmt = stmt.where((col < cval) | ((col == cval) & (model.seq < cseq)))
        else:
            stmt = stmt.where((col > cval) | ((col == cval) & (model.seq > cseq)))
    if newest_first:
        stmt = stmt.order_by(col.desc(), model.seq.desc()) if order_col is not None else stmt.order_by(col.desc())
    else:
        stmt = stmt.order_by(col.asc(), model.seq.asc()) if order_col is not None else stmt.order_by(col.asc())
    rows = list(session.scalars(stmt.limit(limit + 1)))
    return rows[:limit], len(rows) > limit
