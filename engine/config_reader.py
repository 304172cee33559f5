"""Typed reads of a raw config.json, and the error a bad checkpoint raises.

Kept apart from engine.config so that the architecture table (engine.architectures), which engine.config reads,
can parse config.json fields without importing engine.config.
"""

from __future__ import annotations

from typing import Any


class CheckpointError(ValueError):
    """A model directory that cannot be loaded; the message names the file, key or tensor at fault."""


class ConfigReader:
    """A raw config.json and where it came from; `get` checks each key's type and names the file when it fails."""

    _MISSING = object()

    def __init__(self, raw: dict[str, Any], source: str) -> None:
        self.raw, self.source = raw, source

    def get(self, key: str, kind: type, default: Any = _MISSING) -> Any:
        """The value of `key` as `kind` (ints read as floats where a float is asked for); `default` when it is
        absent or null, CheckpointError when it is required or of another type."""
        if key not in self.raw or self.raw[key] is None:
            if default is self._MISSING:
                raise CheckpointError(f"{self.source}: required key {key!r} is missing")
            return default
        value = self.raw[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise CheckpointError(f"{self.source}: key {key!r} must be {kind.__name__}, got {value!r}")
        return value
