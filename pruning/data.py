"""The token windows pruning reads: calibration text (the corpus's validation split, or the user's files) and
the test split perplexity is reported on."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from tokenizers import Tokenizer

from corpus.splits import DEFAULT_CORPUS_DIR, CorpusError
from corpus.tokens import encode_documents, eval_windows, split_tokens


def _tokenizer(model_dir: Path) -> Tokenizer:
    file = model_dir / "tokenizer.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file}: the model has no tokenizer.json to encode calibration text with")
    return Tokenizer.from_file(str(file))


def split_windows(
    model_dir: Path, split: str, seq_len: int, max_tokens: int | None = None, corpus_dir: Path = DEFAULT_CORPUS_DIR
) -> torch.Tensor:
    """[N, seq_len + 1] consecutive windows of a corpus split, at most max_tokens predicted tokens."""
    return eval_windows(split_tokens(_tokenizer(model_dir), split, corpus_dir), seq_len, max_tokens, split)


def file_windows(model_dir: Path, files: list[Path], seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """The same windows from the user's UTF-8 text files (each file one document)."""
    texts = []
    for file in files:
        try:
            texts.append(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CorpusError(f"{file}: calibration file does not exist") from None
        except UnicodeDecodeError as exc:
            raise CorpusError(f"{file}: not UTF-8 text ({exc})") from exc
    return eval_windows(encode_documents(_tokenizer(model_dir), texts), seq_len, max_tokens, "calibration")


def windows_digest(windows: torch.Tensor) -> str:
    """SHA-256 of the windows' tokens: what a calibration cache is keyed by, besides the model."""
    return hashlib.sha256(windows.to(torch.int64).numpy().tobytes() + str(tuple(windows.shape)).encode()).hexdigest()
