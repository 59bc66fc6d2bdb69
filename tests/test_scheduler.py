"""The order units start in: largest first when every source file is on disk, plan order while
a source is still arriving (its files come in plan order)."""

from __future__ import annotations

from pipeline.plan import OutputArray, Unit
from pipeline.scheduler import run_units


class Files:
    """A source whose files are on disk once ``arrived`` says so."""

    def __init__(self, arrived):
        self.arrived = arrived

    def ready(self, file: str) -> bool:
        return self.arrived(file)

    def close(self) -> None:
        pass


def units(sizes: list[int]) -> list[Unit]:
    return [
        Unit(f"u{i}", "copy", (f"t{i}",), (OutputArray("shared", f"a{i}", (n,), "float32"),))
        for i, n in enumerate(sizes)
    ]


def started(pending: list[Unit], source: Files) -> list[str]:
    order: list[str] = []

    def work(u: Unit) -> list:
        order.append(u.id)
        return []

    file_of = {s: f"f{s}" for u in pending for s in u.sources}
    run_units(pending, work, lambda batch: None, source, file_of, workers=1)
    return order


def test_largest_units_start_first_when_every_file_is_on_disk():
    pending = units([10, 500, 7, 500, 90])
    assert started(pending, Files(lambda f: True)) == ["u1", "u3", "u4", "u0", "u2"]


def test_plan_order_while_files_are_arriving():
    pending = units([10, 500, 7, 500, 90])
    asked: list[str] = []

    def arrived(file: str) -> bool:  # the last unit's file arrives once others were asked for
        asked.append(file)
        return file != "ft4" or len(asked) > 10

    assert started(pending, Files(arrived)) == ["u0", "u1", "u2", "u3", "u4"]
