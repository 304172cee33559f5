"""What load-test users send: prompts cut from the corpus's test split to a drawn token length, and drawn output
lengths. Kept free of torch so that every locust process starts fast and stays small."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from corpus.splits import DEFAULT_CORPUS_DIR, read_split


@dataclass(frozen=True)
class LengthDistribution:
    """Token lengths: fixed `N`, uniform `A-B` (inclusive), or `lognormal:MEDIAN:SIGMA` clipped to [1, 8 x median]."""

    kind: str
    a: float
    b: float = 0.0

    @classmethod
    def parse(cls, text: str) -> LengthDistribution:
        spec = text.strip()
        try:
            if spec.startswith("lognormal:"):
                median, sigma = (float(part) for part in spec.removeprefix("lognormal:").split(":"))
                distribution = cls("lognormal", median, sigma)
            elif "-" in spec:
                low, high = (int(part) for part in spec.split("-"))
                distribution = cls("uniform", low, high)
            else:
                distribution = cls("fixed", int(spec))
        except ValueError:
            raise ValueError(f"length distribution {text!r}: expected N, A-B or lognormal:MEDIAN:SIGMA") from None
        if distribution.a < 1 or distribution.kind == "uniform" and distribution.b < distribution.a:
            raise ValueError(f"length distribution {text!r}: lengths must be at least 1 and A <= B")
        return distribution

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            return int(self.a)
        if self.kind == "uniform":
            return rng.randint(int(self.a), int(self.b))
        value = self.a * math.exp(self.b * rng.gauss(0.0, 1.0))
        return max(1, min(round(value), round(8 * self.a)))

    @property
    def mean(self) -> float:
        if self.kind == "fixed":
            return self.a
        if self.kind == "uniform":
            return (self.a + self.b) / 2
        return self.a * math.exp(self.b**2 / 2)  # unclipped


class PromptPool:
    """Token streams of the test split's documents; a prompt of n tokens is a random stretch of one of them,
    decoded to text as a client would send it."""

    def __init__(self, tokenizer_file: Path, split: str = "test", corpus_dir: Path = DEFAULT_CORPUS_DIR) -> None:
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"{tokenizer_file}: no tokenizer to cut prompts with")
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        encodings = self.tokenizer.encode_batch(read_split(split, corpus_dir), add_special_tokens=False)
        self.documents = [e.ids for e in encodings if e.ids]
        if not self.documents:
            raise ValueError(f"the {split} split of {corpus_dir} has no text to cut prompts from")
        self.longest = max(len(ids) for ids in self.documents)

    def prompt(self, num_tokens: int, rng: random.Random) -> str:
        """Text of about num_tokens tokens (fewer when no document is that long)."""
        candidates = [ids for ids in self.documents if len(ids) >= num_tokens] or [max(self.documents, key=len)]
        ids = rng.choice(candidates)
        start = rng.randint(0, max(0, len(ids) - num_tokens))
        return self.tokenizer.decode(ids[start : start + num_tokens])
