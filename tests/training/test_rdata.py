"""The R lazy-load reader on a database written byte by byte in R's XDR serialization format."""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import pytest

from training.rdata import RDataError, read_lazyload


def i32(*values: int) -> bytes:
    return struct.pack(f">{len(values)}i", *values)


def chars(text: str | None) -> bytes:
    return i32(9, -1) if text is None else i32(9, len(text.encode())) + text.encode()


def strings(*texts: str | None) -> bytes:
    return i32(16, len(texts)) + b"".join(chars(t) for t in texts)


def named_list(items: list[bytes], names: list[str], names_symbol: bytes) -> bytes:
    """VECSXP with a names attribute: a tagged pairlist (tag = the `names` symbol) ending in NILVALUE."""
    attributes = i32(2 | 1 << 10) + names_symbol + strings(*names) + i32(254)
    return i32(19 | 1 << 9, len(items)) + b"".join(items) + attributes


HEADER = b"X\n" + i32(2, 0x040300, 0x020300)
NEW_NAMES_SYMBOL = i32(1) + chars("names")
NAMES_REF = i32(1 << 8 | 255)  # the first symbol read, by reference, as R writes repeated symbols


def write_database(tmp_path: Path, payload: bytes) -> Path:
    record = struct.pack(">i", len(payload)) + zlib.compress(payload)
    # A vector's items precede its attributes, so the inner list introduces the symbol and the outer refers to it.
    variables = named_list([i32(13, 2, 0, len(record))], ["novel"], NEW_NAMES_SYMBOL)
    index = HEADER + named_list([variables], ["variables"], NAMES_REF)
    (tmp_path / "Rdata.rdb").write_bytes(record)
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(index))
    return tmp_path / "Rdata.rdx"


def test_reads_a_character_vector_with_missing_values(tmp_path: Path) -> None:
    rdx = write_database(tmp_path, HEADER + strings("CHAPTER 1", None, "It was a truth."))
    assert read_lazyload(rdx) == {"novel": ["CHAPTER 1", None, "It was a truth."]}


def test_compact_integer_sequence_expands(tmp_path: Path) -> None:
    info = i32(2) + i32(1) + chars("compact_intseq") + i32(254)  # pairlist(class symbol)
    state = i32(14, 3) + struct.pack(">3d", 4.0, 10.0, 1.0)  # n = 4, start = 10, step = 1
    rdx = write_database(tmp_path, HEADER + i32(238) + info + state + i32(254))
    assert read_lazyload(rdx) == {"novel": [10.0, 11.0, 12.0, 13.0]}


def test_unsupported_or_corrupt_data_is_named(tmp_path: Path) -> None:
    rdx = write_database(tmp_path, HEADER + i32(25, 0))  # S4 object: not a data set type
    with pytest.raises(RDataError, match=r"Rdata.rdb:novel: R object type 25"):
        read_lazyload(rdx)
    rdx = write_database(tmp_path, HEADER + i32(16, 3) + chars("only one"))
    with pytest.raises(RDataError, match="truncated"):
        read_lazyload(rdx)
    (tmp_path / "Rdata.rdx").write_bytes(b"not gzip")
    with pytest.raises(RDataError, match="Rdata.rdx: cannot read"):
        read_lazyload(tmp_path / "Rdata.rdx")
