"""The README states what the code does: its table of arrays is the layout table's."""

from __future__ import annotations

from pathlib import Path

from mimo.layout import readme_table

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_array_table_is_the_layout_table():
    assert readme_table() in README.read_text()
