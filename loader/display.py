"""Text shared by the command lines: index ranges and byte counts."""

from __future__ import annotations


def ranges(ids: list[int] | None) -> str:
    """``[0, 1, 2, 3, 5]`` -> ``"0-3,5"``; None -> ``"all"``."""
    if ids is None:
        return "all"
    out, start = [], None
    for i, v in enumerate(ids):
        start = v if start is None else start
        if i + 1 == len(ids) or ids[i + 1] != v + 1:
            out.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ",".join(out)


def size(n: int) -> str:
    """Bytes in decimal units: ``19.35 GB``, ``37.1 MB``, ``1.3 kB``, ``8 B``."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}" if unit == "GB" else f"{n / scale:.1f} {unit}"
    return f"{n} B"
