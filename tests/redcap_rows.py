"""An independent reading of REDCap CSV exports for the tests: the csv module, row by row."""

from __future__ import annotations

import csv
import io


def raw_rows(text: str, *, skip_blank: bool = False) -> list[tuple[int, dict[str, str]]]:
    """(line the row starts on, column -> cell) per data row; ``skip_blank`` drops empty rows."""
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader)
    rows: list[tuple[int, dict[str, str]]] = []
    end = reader.line_num
    for row in reader:
        start, end = end + 1, reader.line_num
        if not skip_blank or any(cell for cell in row):
            rows.append((start, dict(zip(header, row, strict=True))))
    return rows
