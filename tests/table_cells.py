"""Read back the rows of a printed rich table (shared by the report and CLI tests)."""

from shared.strategies import ALL_STRATEGIES


def parse_table(text: str) -> list[list[str]]:
    """Cells of each body row of a rich SQUARE-box table (rows start with a strategy name)."""
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if cells and cells[0] in ALL_STRATEGIES:
            rows.append(cells)
    return rows
