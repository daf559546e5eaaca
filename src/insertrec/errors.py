"""Errors a user can act on.

Every failure caused by input (files, catalog, model directory, request) is an
``InsertrecError``: the CLI prints its one-line ``str()`` and exits non-zero,
and the API turns it into a 4xx. Anything else is a bug and may show a trace.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CatalogError", "DataError", "InsertrecError", "ModelError", "Problem"]


class InsertrecError(Exception):
    """An error whose message is meant for the user, on one line."""


@dataclass(frozen=True)
class Problem:
    """One bad cell or row: where it is and why it is refused.

    ``row`` is the 1-based line number in the file as a user sees it in an
    editor (header is line 1, so the first data row is line 2); for Parquet it
    is the 1-based row number.
    """

    file: str
    row: int | None
    column: str | None
    reason: str
    value: str | None = None

    def __str__(self) -> str:
        where = self.file
        if self.row is not None:
            where += f" line {self.row}"
        if self.column is not None:
            where += f" column {self.column!r}"
        shown = "" if self.value is None else f" (got {self.value!r})"
        return f"{where}: {self.reason}{shown}"


class DataError(InsertrecError):
    """Input data refused; carries every problem found, not just the first."""

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        first = self.problems[0] if self.problems else None
        more = len(self.problems) - 1
        msg = f"invalid data: {first}" if first else "invalid data"
        if more > 0:
            msg += f" (and {more} more problem{'s' if more > 1 else ''}; see the full list)"
        super().__init__(msg)

    def details(self) -> str:
        """The full list, one problem a line, for the user to fix them all at once."""
        return "\n".join(str(p) for p in self.problems)


class CatalogError(InsertrecError):
    """catalog.yaml refused: names the line and the field.

    A catalog with several mistakes is refused once: ``problems`` holds each
    (line, field, reason), the message is the first one and how many more,
    and ``details()`` lists them all, as ``DataError`` does for data.
    """

    def __init__(self, reason: str, *, field: str | None = None, line: int | None = None,
                 file: str = "catalog.yaml", problems: tuple[CatalogError, ...] = ()):
        self.reason, self.field, self.line, self.file = reason, field, line, file
        self.problems: tuple[CatalogError, ...] = problems or (self,)
        where = file + (f" line {line}" if line is not None else "")
        where += f" field {field!r}" if field else ""
        more = len(self.problems) - 1
        super().__init__(f"{where}: {reason}" + (f" (and {more} more problem{'s' if more > 1 else ''}; "
                                                 "see the full list)" if more else ""))

    @classmethod
    def of(cls, problems: list[CatalogError]) -> CatalogError:
        """One error for all of ``problems`` (at least one), in the order they were found."""
        if len(problems) == 1:
            return problems[0]
        first = problems[0]
        return cls(first.reason, field=first.field, line=first.line, file=first.file, problems=tuple(problems))

    def details(self) -> str:
        """The full list, one problem a line."""
        return "\n".join(str(p) for p in self.problems)


class ModelError(InsertrecError):
    """A model directory that is missing, incomplete, tampered with or incompatible."""
