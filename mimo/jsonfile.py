"""Reading a small JSON document from untrusted bytes, with bounds checked before parsing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config that cannot describe a MiMo-V2-Flash model; the message names the key."""


def load_json_object(data: bytes, limit: int) -> dict[str, Any]:
    """Parse ``data`` as one JSON object of at most ``limit`` bytes and bounded nesting (the
    decoder's recursion limit, about a thousand levels).

    Raises ConfigError (no traceback-worthy exception escapes) for oversized, non-UTF-8,
    malformed, too deeply nested or non-object input.
    """
    if len(data) > limit:
        raise ConfigError(f"larger than {limit} bytes: not a config")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"not UTF-8 text (byte {e.start})") from None
    try:
        raw = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise ConfigError(f"not valid JSON ({e})") from None
    except RecursionError:  # the decoder's own bound on nesting, checked while it parses
        raise ConfigError("nested deeper than the JSON decoder allows: not a config") from None
    if not isinstance(raw, dict):
        raise ConfigError("top level must be a JSON object")
    return raw


def load_json_file(path: Path, limit: int) -> dict[str, Any]:
    """:func:`load_json_object` of the file ``path``; ConfigError names the file."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        return load_json_object(data, limit)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def _no_constant(name: str) -> float:
    raise ConfigError(f"non-finite number {name} is not valid JSON")
