"""Terminal output for the client commands: HTTP request logs kept quiet unless asked for, one progress bar, errors,
and tables that never cut a policy name (rich when stdout is a terminal, a plain aligned layout when it is not)."""

from __future__ import annotations

import logging
import shlex
from dataclasses import dataclass, field
from typing import Annotated, Literal

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

console = Console()
err = Console(stderr=True)

HTTP_LOGGERS = ("httpx", "httpcore")


def quiet_http_logs(*, verbose: bool = False) -> None:
    """httpx logs one INFO line per request; a long command shows its progress bar instead (--verbose: the lines)."""
    for name in HTTP_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)


def progress_bar(out: Console | None = None, *, transient: bool = False) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=out or err, transient=transient)


def fail(message: str) -> typer.Exit:
    # escape: messages quote policy syntax with [brackets]; soft_wrap: one line, whatever the terminal width
    err.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    return typer.Exit(2)


@dataclass(frozen=True)
class Column:
    name: str
    justify: Literal["left", "right"] = "left"
    keep_whole: bool = False  # policy names: never wrapped, the other columns give way


@dataclass
class TextTable:
    """Rows of plain strings. In a terminal a rich table whose `keep_whole` columns keep their full width (the
    others fold); elsewhere (a file, a pipe, a CI log, or a terminal narrower than the policy names) the same cells
    aligned in plain text, long lines left to wrap: nothing is ever cut."""

    columns: list[Column]
    title: str | None = None
    rows: list[list[str]] = field(default_factory=list)
    sections: set[int] = field(default_factory=set)  # a rule after these rows

    def add_row(self, *cells: str, end_section: bool = False) -> None:
        assert len(cells) == len(self.columns), (cells, self.columns)
        self.rows.append([str(c) for c in cells])
        if end_section:
            self.sections.add(len(self.rows) - 1)

    def rich(self) -> Table:
        t = Table(title=None if self.title is None else escape(self.title))
        for i, c in enumerate(self.columns):
            widest = max([len(c.name), *(len(r[i]) for r in self.rows)])
            t.add_column(escape(c.name), justify=c.justify, overflow="fold", no_wrap=c.keep_whole,
                         min_width=widest if c.keep_whole else None)
        for n, row in enumerate(self.rows):
            t.add_row(*map(escape, row), end_section=n in self.sections)
        return t

    def plain(self) -> str:
        widths = [max([len(c.name), *(len(r[i]) for r in self.rows)]) for i, c in enumerate(self.columns)]

        def line(cells: list[str]) -> str:
            return "  ".join(cell.rjust(w) if c.justify == "right" else cell.ljust(w)
                             for cell, w, c in zip(cells, widths, self.columns)).rstrip()

        out = [self.title] if self.title else []
        out += [line([c.name for c in self.columns]), "  ".join("-" * w for w in widths)]
        out += [line(r) for r in self.rows]
        return "\n".join(out)

    def _min_width(self) -> int:
        """The narrowest the rich table can be: whole `keep_whole` columns, a few characters for the others."""
        widths = [max([len(c.name), *(len(r[i]) for r in self.rows)]) if c.keep_whole else 3
                  for i, c in enumerate(self.columns)]
        return sum(w + 3 for w in widths) + 1  # padding and a border per column

    def print(self, out: Console | None = None) -> None:
        out = out or console
        if out.is_terminal and self._min_width() <= out.width:
            out.print(self.rich())
        else:
            out.print(self.plain(), markup=False, highlight=False, soft_wrap=True, crop=False)


VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="also log every HTTP request (httpx's INFO lines)")]


def command_line(ctx: typer.Context) -> str:
    """The running command as a user would type it, options at their defaults left out: reports say how they were
    made. `ctx` is the command's typer context (a `ctx: typer.Context` parameter)."""
    parts = ["painters", ctx.info_name or ""]
    for param in ctx.command.params:
        value = ctx.params.get(param.name or "")
        if param.param_type_name != "option" or value is None or value == param.default:
            continue
        if getattr(param, "is_flag", False):
            parts.append(param.opts[0] if value else (getattr(param, "secondary_opts", None) or param.opts)[0])
            continue
        for v in value if isinstance(value, (list, tuple)) else [value]:
            parts += [param.opts[0], str(v)]
    return shlex.join(parts)
