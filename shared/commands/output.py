"""How the audit and port commands print a report: its table, note lines, one line each."""

from __future__ import annotations

__all__ = ["print_report"]


def print_report(table, notes, lines, min_width: int) -> None:
    """A report as audit and port print it: the rich table, ``note:`` lines, one line each."""
    from rich.console import Console

    Console(width=max(Console().width, min_width)).print(table)
    for note in notes:
        print(f"note: {note}")
    for line in lines:
        print(line)
