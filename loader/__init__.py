"""Read side of a mimo-shard output: config, on-disk format, zero-copy device slices, checks."""

from loader.checks import LoaderError
from loader.device import Device, open_device

__all__ = ["Device", "LoaderError", "open_device"]
