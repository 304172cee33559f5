"""Read character data out of an installed R package's lazy-load database (.rdx/.rdb), with no R installed.

R's serialization format (XDR, versions 2 and 3) is small enough to decode the parts that data sets use:
vectors, lists, pairlists, symbols and attributes. This is how the Jane Austen novels are read from Debian's
r-cran-janeaustenr package.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path
from typing import Any

_NIL, _REF, _SYM, _LIST, _CHAR, _LGL, _INT, _REAL, _STR, _VEC, _ALTREP = 254, 255, 1, 2, 9, 10, 13, 14, 16, 19, 238
_PAIRLIST_TYPES = {2, 3, 5, 6, 17}  # pairlist, closure, promise, language, dots
_SINGLETONS = {242, 241, 253, 252, 251, 250}  # empty, base, global env; unbound; missing arg; base namespace


class RDataError(ValueError):
    """An R data file this reader cannot decode; the message names the file and what went wrong."""


class _Reader:
    def __init__(self, data: bytes, source: str) -> None:
        self.data, self.pos, self.source = data, 0, source
        self.refs: list[Any] = []

    def _take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise RDataError(f"{self.source}: truncated R serialization at byte {self.pos}")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def read_int(self) -> int:
        return struct.unpack(">i", self._take(4))[0]

    def length(self) -> int:
        n = self.read_int()
        return n if n != -1 else (self.read_int() << 32) + (self.read_int() & 0xFFFFFFFF)

    def header(self) -> None:
        if self._take(2) != b"X\n":
            raise RDataError(f"{self.source}: not an XDR-format R serialization")
        version = self.read_int()
        self.read_int(), self.read_int()
        if version == 3:
            self._take(self.read_int())
        elif version != 2:
            raise RDataError(f"{self.source}: unsupported R serialization version {version}")

    def item(self) -> Any:
        flags = self.read_int()
        kind, has_attr, has_tag = flags & 0xFF, bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if kind == _NIL or kind in _SINGLETONS:
            return None
        if kind == _REF:
            index = flags >> 8 or self.read_int()
            if not 1 <= index <= len(self.refs):
                raise RDataError(f"{self.source}: reference {index} at byte {self.pos} points nowhere")
            return self.refs[index - 1]
        if kind == _SYM:
            symbol = self.item()
            self.refs.append(symbol)
            return symbol
        if kind in _PAIRLIST_TYPES:
            return self._pairlist(has_attr, has_tag)
        if kind == _ALTREP:
            return self._altrep()
        if kind == _CHAR:
            n = self.read_int()
            return None if n == -1 else self._take(n).decode("utf-8", errors="replace")
        if kind in (_LGL, _INT):
            n = self.length()
            value: Any = list(struct.unpack(f">{n}i", self._take(4 * n)))
        elif kind == _REAL:
            n = self.length()
            value = list(struct.unpack(f">{n}d", self._take(8 * n)))
        elif kind in (_STR, _VEC, 20):
            value = [self.item() for _ in range(self.length())]
        else:
            raise RDataError(f"{self.source}: R object type {kind} at byte {self.pos} is not supported")
        if has_attr:
            attributes = self.item()
            if isinstance(value, list) and isinstance(attributes, dict) and "names" in attributes:
                return _Named(value, attributes)
        return value

    def _altrep(self) -> Any:
        """Compact sequences and wrappers, the ALTREP classes R writes for plain data; others are refused."""
        info, state = self.item(), self.item()
        self.item()
        name = next(iter(info.values())) if isinstance(info, dict) and info else None
        if name in ("compact_intseq", "compact_realseq"):
            n, start, step = state
            return [start + i * step for i in range(int(n))]
        if isinstance(name, str) and name.startswith("wrap_"):
            return state[0]
        raise RDataError(f"{self.source}: ALTREP class {name!r} at byte {self.pos} is not supported")

    def _pairlist(self, has_attr: bool, has_tag: bool) -> dict[str, Any]:
        out: dict[str, Any] = {}
        while True:
            if has_attr:
                self.item()
            tag = self.item() if has_tag else str(len(out))
            out[str(tag)] = self.item()
            flags = self.read_int()
            kind = flags & 0xFF
            if kind == _NIL:
                return out
            if kind not in _PAIRLIST_TYPES:
                raise RDataError(f"{self.source}: malformed pairlist at byte {self.pos}")
            has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))


class _Named(list[Any]):
    """An R vector with a names attribute (a data frame or named list)."""

    def __init__(self, values: list[Any], attributes: dict[str, Any]) -> None:
        super().__init__(values)
        self.attributes = attributes

    def as_dict(self) -> dict[str, Any]:
        names = self.attributes["names"]
        if len(names) != len(self):
            raise RDataError(f"{len(names)} names for {len(self)} values")
        return dict(zip(names, self, strict=True))


def _unserialize(data: bytes, source: str) -> Any:
    reader = _Reader(data, source)
    reader.header()
    return reader.item()


def read_lazyload(rdx: Path) -> dict[str, Any]:
    """Every object of a lazy-load database (`X.rdx` beside `X.rdb`), by name; named vectors become dicts."""
    rdb = rdx.with_suffix(".rdb")
    try:
        index = _unserialize(gzip.decompress(rdx.read_bytes()), str(rdx))
        blob = rdb.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise RDataError(f"{rdx}: cannot read the lazy-load database ({exc})") from exc
    variables = index.as_dict()["variables"] if isinstance(index, _Named) else None
    if not isinstance(variables, _Named):
        raise RDataError(f"{rdx}: no 'variables' index")
    objects = {}
    for name, (offset, size) in variables.as_dict().items():
        record = blob[int(offset) : int(offset) + int(size)]
        try:
            payload = zlib.decompress(record[4:])
        except zlib.error as exc:
            raise RDataError(f"{rdb}: object {name!r} is not zlib-compressed ({exc})") from exc
        value = _unserialize(payload, f"{rdb}:{name}")
        objects[name] = value.as_dict() if isinstance(value, _Named) else value
    return objects
