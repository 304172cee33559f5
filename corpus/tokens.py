"""Token streams of the corpus splits, and the fixed windows evaluators score."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from corpus.splits import DEFAULT_CORPUS_DIR, read_split
from engine.tokenizer import END_OF_TEXT


def encode_documents(tokenizer: Tokenizer, texts: list[str]) -> torch.Tensor:
    """One int64 stream: each document's tokens followed by end of text."""
    eos = tokenizer.token_to_id(END_OF_TEXT)
    if eos is None:
        raise ValueError(f"the tokenizer has no {END_OF_TEXT} token to separate documents")
    ids: list[int] = []
    for encoding in tokenizer.encode_batch(texts, add_special_tokens=False):
        ids.extend(encoding.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.int64)


def split_tokens(tokenizer: Tokenizer, split: str, corpus_dir: Path = DEFAULT_CORPUS_DIR) -> torch.Tensor:
    """A split's token stream, cached beside the corpus under the tokenizer's and split's hashes."""
    source = corpus_dir / f"{split}.jsonl"
    key = hashlib.sha256(tokenizer.to_str().encode() + b"\0" + str(source.stat().st_mtime_ns).encode()).hexdigest()
    cache = corpus_dir / ".tokens" / f"{split}-{key[:16]}.npy"
    if cache.is_file():
        return torch.from_numpy(np.load(cache).astype(np.int64))
    tokens = encode_documents(tokenizer, read_split(split, corpus_dir))
    cache.parent.mkdir(exist_ok=True)
    dtype = np.uint16 if tokenizer.get_vocab_size() <= 1 << 16 else np.int32
    tmp = cache.with_name(f"{cache.stem}.{os.getpid()}.tmp.npy")  # concurrent runs each write their own
    np.save(tmp, tokens.numpy().astype(dtype))
    os.replace(tmp, cache)
    return tokens


def eval_windows(
    tokens: torch.Tensor, seq_len: int, max_tokens: int | None = None, split: str = "evaluation"
) -> torch.Tensor:
    """Consecutive non-overlapping [n, seq_len + 1] windows (each predicts seq_len tokens) from the start."""
    usable = len(tokens) - 1
    if max_tokens is not None:
        usable = min(usable, max_tokens)
    n = usable // seq_len
    if n == 0:
        raise ValueError(f"the {split} split has {len(tokens)} tokens, too few for one window of {seq_len}")
    return torch.stack([tokens[i * seq_len : i * seq_len + seq_len + 1] for i in range(n)])
