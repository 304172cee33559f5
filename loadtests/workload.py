"""What load-test users send: prompts cut from the corpus's test split to a drawn token length, and drawn output
lengths. Kept free of torch so that every locust process starts fast and stays small."""

from __future__ import annotations

import bisect
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tokenizers import Tokenizer

from corpus.splits import DEFAULT_CORPUS_DIR, read_split

SPEC_FORMS = "N, A-B or lognormal:MEDIAN:SIGMA"


@dataclass(frozen=True)
class LengthDistribution:
    """Token lengths: fixed `N`, uniform `A-B` (inclusive), or `lognormal:MEDIAN:SIGMA` clipped to [1, 8 x median]."""

    kind: Literal["fixed", "uniform", "lognormal"]
    center: float  # the fixed length, the uniform low end, or the lognormal median
    spread: float = 0.0  # the uniform high end, or the lognormal sigma

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
            raise ValueError(f"length distribution {text!r}: expected {SPEC_FORMS}") from None
        if not (math.isfinite(distribution.center) and math.isfinite(distribution.spread)):
            raise ValueError(f"length distribution {text!r}: numbers must be finite")
        if distribution.center < 1 or distribution.spread < 0:
            raise ValueError(f"length distribution {text!r}: lengths must be at least 1, sigma at least 0")
        if distribution.kind == "uniform" and distribution.spread < distribution.center:
            raise ValueError(f"length distribution {text!r}: A must not exceed B")
        return distribution

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            return int(self.center)
        if self.kind == "uniform":
            return rng.randint(int(self.center), int(self.spread))
        value = self.center * math.exp(self.spread * rng.gauss(0.0, 1.0))
        return max(1, min(round(value), round(8 * self.center)))

    @property
    def mean(self) -> float:
        if self.kind == "fixed":
            return self.center
        if self.kind == "uniform":
            return (self.center + self.spread) / 2
        return self.center * math.exp(self.spread**2 / 2)  # unclipped


class PromptPool:
    """Token streams of the test split's documents; a prompt of n tokens is a random stretch of one of them,
    decoded to text as a client would send it."""

    def __init__(self, tokenizer_file: Path, split: str = "test", corpus_dir: Path = DEFAULT_CORPUS_DIR) -> None:
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"{tokenizer_file}: no tokenizer to cut prompts with")
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        encodings = self.tokenizer.encode_batch(read_split(split, corpus_dir), add_special_tokens=False)
        self.documents = sorted((e.ids for e in encodings if e.ids), key=len)  # shortest first
        if not self.documents:
            raise ValueError(f"the {split} split of {corpus_dir} has no text to cut prompts from")
        self.lengths = [len(ids) for ids in self.documents]

    def prompt(self, num_tokens: int, rng: random.Random) -> str:
        """Text of about num_tokens tokens (fewer when no document is that long)."""
        first_long_enough = min(bisect.bisect_left(self.lengths, num_tokens), len(self.documents) - 1)
        ids = self.documents[rng.randrange(first_long_enough, len(self.documents))]
        start = rng.randint(0, max(0, len(ids) - num_tokens))
        return self.tokenizer.decode(ids[start : start + num_tokens])
