"""The corpus's document splits (train, validation, test) as JSON lines under data/corpus.

Documents are assigned to a split by a hash of their id when the corpus is built (`moe-train corpus`); the
test split is what perplexity is reported on everywhere: `read_split("test")`.
"""

from __future__ import annotations

import json
from pathlib import Path

from engine.paths import SOURCE_ROOT, bundled

REPO_ROOT = SOURCE_ROOT
DEFAULT_CORPUS_DIR = bundled("data/corpus")
SPLITS = ("train", "validation", "test")


class CorpusError(RuntimeError):
    """A corpus that cannot be built or read; the message names the source, file or split."""


def read_split(split: str, corpus_dir: Path = DEFAULT_CORPUS_DIR) -> list[str]:
    """The documents' texts of one split ("train", "validation" or "test"), in corpus order."""
    if split not in SPLITS:
        raise CorpusError(f"unknown split {split!r}; expected one of {SPLITS}")
    file = corpus_dir / f"{split}.jsonl"
    if not file.is_file():
        raise CorpusError(f"{file}: missing; build the corpus with `moe-train corpus --out {corpus_dir}`")
    texts = []
    with open(file, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            try:
                texts.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CorpusError(f"{file}:{number}: not a document record ({exc!r})") from exc
    return texts
