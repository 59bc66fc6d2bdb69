"""Read side of a mimo-shard output: config, on-disk format, zero-copy device slices, checks."""

from loader.device import Device, open_device
from loader.manifest import LoaderError

__all__ = ["Device", "LoaderError", "open_device"]
