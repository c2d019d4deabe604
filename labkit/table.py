"""One table renderer: escaped HTML in a notebook, aligned text everywhere else.

    >>> t = Table(["run", "peak"], [["before", 12], ["after", 3]], title="peak holders")
    >>> print(t)
    peak holders
    run     peak
    ------  ----
    before    12
    after      3

Numbers are right-aligned and formatted with :func:`fmt` (integers as
integers, others to 3 significant digits); everything else is left-aligned. Every cell is HTML-escaped, so a task's
output or an exception message can be shown safely.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Sequence
from typing import Any


def fmt(x: float | None) -> str:
    """A readable number: integers as integers, others with 3 significant digits; NaN as n/a."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if math.isinf(x):
        return "∞"
    if float(x).is_integer() and abs(x) < 1e6:
        return str(int(x))
    return f"{x:.3g}"


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if _numeric(value):
        return fmt(value)
    return str(value)


def _numeric(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class Table:
    """Rows under column headers; ``str()`` for text, ``_repr_html_`` for Jupyter."""

    def __init__(self, columns: Sequence[str], rows: Iterable[Sequence[Any]], *, title: str = "",
                 note: str = "") -> None:
        self.columns = list(columns)
        self.rows = [list(r) for r in rows]
        for r in self.rows:
            if len(r) != len(self.columns):
                raise ValueError(f"row {r!r} has {len(r)} cells for {len(self.columns)} columns")
        self.title = title
        self.note = note

    @classmethod
    def from_dicts(cls, records: Iterable[dict[str, Any]], columns: Sequence[str] | None = None,
                   **kwargs: Any) -> Table:
        """A table from dicts (columns: ``columns``, else the first record's keys)."""
        records = list(records)
        cols = list(columns) if columns is not None else (list(records[0]) if records else [])
        return cls(cols, [[rec.get(c, "") for c in cols] for rec in records], **kwargs)

    def __str__(self) -> str:
        cells = [[_fmt(v) for v in r] for r in self.rows]
        widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(self.columns)]
        numeric = [bool(self.rows) and all(_numeric(r[i]) or r[i] is None for r in self.rows)
                   for i in range(len(self.columns))]

        def line(values: Sequence[str], header: bool = False) -> str:
            return "  ".join(
                v.rjust(w) if numeric[i] and not header else v.ljust(w)
                for i, (v, w) in enumerate(zip(values, widths, strict=True))
            ).rstrip()

        out = [self.title] if self.title else []
        out.append(line(self.columns, header=True))
        out.append("  ".join("-" * w for w in widths))
        out.extend(line(r) for r in cells)
        if self.note:
            out.append(self.note)
        return "\n".join(out)

    def __repr__(self) -> str:
        return str(self)

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.columns)
        body = "".join(
            "<tr>" + "".join(
                f"<td style='text-align:{'right' if _numeric(v) else 'left'}'>{html.escape(_fmt(v))}</td>"
                for v in r) + "</tr>"
            for r in self.rows
        )
        title = f"<b>{html.escape(self.title)}</b>" if self.title else ""
        note = f"<br><small>{html.escape(self.note)}</small>" if self.note else ""
        return f"<div>{title}<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{note}</div>"
