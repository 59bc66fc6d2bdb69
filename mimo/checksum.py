"""The chunk checksum: CRC32 with zlib's polynomial, as ``crc32:xxxxxxxx`` in the manifest.

Computed by ISA-L (the ``isal`` package: carry-less-multiply folding, about seven times the rate
of the zlib that CPython links, 36-42 against 6 GB/s on one core in ``bench/kernel.py``) with
the very values of :func:`zlib.crc32`, so manifests written with either agree. Like zlib's, it
releases the GIL on large buffers, so worker threads checksum in parallel.
"""

from __future__ import annotations

from isal.isal_zlib import crc32 as _crc32


def crc32(data, value: int = 0) -> int:
    """CRC32 of the bytes of ``data`` (any buffer), continuing from ``value`` (0 to start):
    ``crc32(b, crc32(a)) == crc32(a + b)``, equal to ``zlib.crc32(data, value)``."""
    return _crc32(data, value)


def format_crc32(value: int) -> str:
    """The manifest's spelling of a checksum: ``crc32:`` and eight lower-case hex digits."""
    return f"crc32:{value:08x}"
