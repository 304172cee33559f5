"""Prompt and output length distributions, prompts cut from the test split, and the run summary's arithmetic."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest

from loadtests.locust_run import summarize
from loadtests.workload import LengthDistribution, PromptPool


@pytest.mark.parametrize(("spec", "low", "high"), [("64", 64, 64), ("8-32", 8, 32), ("lognormal:50:0.5", 1, 400)])
def test_lengths_stay_in_their_distribution(spec: str, low: int, high: int) -> None:
    distribution = LengthDistribution.parse(spec)
    rng = random.Random(0)
    draws = [distribution.sample(rng) for _ in range(2000)]
    assert low <= min(draws) and max(draws) <= high
    assert sum(draws) / len(draws) == pytest.approx(distribution.mean, rel=0.08)
    if distribution.kind != "fixed":
        assert len(set(draws)) > 10


@pytest.mark.parametrize("spec", ["", "0", "32-8", "abc", "lognormal:50", "5-x", "lognormal:inf:1", "lognormal:9:-1"])
def test_bad_length_specs_name_the_input(spec: str) -> None:
    with pytest.raises(ValueError, match="length distribution"):
        LengthDistribution.parse(spec)


def test_prompts_have_about_the_drawn_token_count(tiny_model: Path) -> None:
    pool = PromptPool(tiny_model / "tokenizer.json")
    rng = random.Random(1)
    for n in (1, 16, 200):
        prompt = pool.prompt(n, rng)
        assert abs(len(pool.tokenizer.encode(prompt, add_special_tokens=False).ids) - n) <= max(2, n // 10)
    assert pool.prompt(32, random.Random(7)) == pool.prompt(32, random.Random(7))


def test_missing_tokenizer_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        PromptPool(tmp_path / "tokenizer.json")


def test_summary_counts_only_successes_over_the_whole_span() -> None:
    samples = [
        {"start": 0.0, "end": 1.0, "ok": True, "ttft": 0.1, "itl": [0.01, 0.03], "tokens": 10, "prompt_tokens": 6},
        {"start": 0.5, "end": 2.0, "ok": True, "ttft": 0.3, "itl": [0.02], "tokens": 31, "prompt_tokens": 2},
        {"start": 1.0, "end": 4.0, "ok": False},
    ]
    result = summarize(samples, users=2)
    assert (result.requests, result.failures, result.duration_s) == (2, 1, 4.0)
    assert result.requests_per_s == 0.5 and result.output_tokens_per_s == 10.25 and result.input_tokens_per_s == 2.0
    # Time per output token after the first: 0.9 s / 9 tokens and 1.2 s / 30 tokens.
    assert result.tpot_ms[50] == pytest.approx((100.0 + 40.0) / 2)
    assert result.ttft_ms[50] == pytest.approx(200.0) and result.itl_ms[50] == pytest.approx(20.0)
    assert result.e2e_ms[99] == pytest.approx(1495.0)
    with pytest.raises(RuntimeError, match="no request successfully"):
        summarize(samples[2:], users=1)
    assert math.isnan(summarize([{**samples[0], "itl": []}], users=1).itl_ms[50])
