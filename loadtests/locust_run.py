"""One headless locust run of loadtests/locustfile.py in its own process, summarized from the per-request timings
it writes."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from loadtests.workload import LengthDistribution

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
PERCENTILES = (50, 99)


@dataclass(frozen=True)
class Workload:
    """What every user sends (loadtests/workload.py's length distributions) and the run's bounds."""

    prompt_tokens: str = "32-256"
    output_tokens: str = "32-128"
    chat_share: float = 0.25
    temperature: float = 0.8
    duration_s: int = 20
    max_requests: int = 2000
    seed: int = 0
    stop_timeout_s: int = 120  # requests running when the time is up may finish (and count) within this

    def __post_init__(self) -> None:
        for spec in (self.prompt_tokens, self.output_tokens):
            LengthDistribution.parse(spec)
        if self.duration_s < 1 or self.max_requests < 1:
            raise ValueError(f"a run needs at least 1 s and 1 request, got {self.duration_s} s, {self.max_requests}")
        if not 0.0 <= self.chat_share <= 1.0:
            raise ValueError(f"the chat share must be in [0, 1], got {self.chat_share}")


@dataclass(frozen=True)
class LoadResult:
    users: int
    requests: int
    failures: int
    duration_s: float
    requests_per_s: float
    input_tokens_per_s: float
    output_tokens_per_s: float
    ttft_ms: dict[int, float]  # percentile -> milliseconds
    itl_ms: dict[int, float]
    tpot_ms: dict[int, float]  # per request: (end - first token) / (output tokens - 1), as vLLM's benchmarks
    e2e_ms: dict[int, float]


def run_locust(
    url: str, users: int, workload: Workload, out_dir: Path, api_key: str | None = None, tokenizer: Path | None = None
) -> LoadResult:
    """Run `users` closed-loop streaming clients against url for workload.duration_s (or max_requests)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    samples_file = out_dir / f"locust-u{users}.json"
    command = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
        "-u", str(users), "-r", str(users), "-t", f"{workload.duration_s}s", "--host", url,
        "--stop-timeout", str(workload.stop_timeout_s),
        "--samples-file", str(samples_file), "--json-file", str(out_dir / f"locust-u{users}-stats"), "--loglevel", "WARNING",
        "--prompt-tokens", workload.prompt_tokens, "--output-tokens", workload.output_tokens,
        "--chat-share", str(workload.chat_share), "--temperature", str(workload.temperature),
        "--max-requests", str(workload.max_requests), "--workload-seed", str(workload.seed),
    ]  # fmt: skip
    if api_key:
        command += ["--api-key", api_key]
    if tokenizer is not None:
        command += ["--tokenizer", str(tokenizer)]
    log = out_dir / f"locust-u{users}.log"
    # Locust's own limits end the run; this bound only catches a locust that hangs on its way out.
    limit = workload.duration_s + workload.stop_timeout_s + 60
    try:
        with open(log, "w") as log_file:
            finished = subprocess.run(command, check=False, stdout=log_file, stderr=subprocess.STDOUT, timeout=limit)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"locust ran past {limit} s and was killed; see {log}") from None
    if finished.returncode not in (0, 1):  # 1: some requests failed, which the result reports
        raise RuntimeError(f"locust exited with status {finished.returncode}; see {log}")
    if not samples_file.is_file():
        raise RuntimeError(f"locust wrote no samples; see {log}")
    return summarize(json.loads(samples_file.read_text()), users)


def summarize(samples: list[dict[str, Any]], users: int) -> LoadResult:
    """Throughput over the span from the first request sent to the last one finished, and latency percentiles
    of the requests that succeeded."""
    ok = [sample for sample in samples if sample["ok"]]
    if not ok:
        raise RuntimeError(
            f"locust completed no request successfully ({len(samples)} failed); is the server answering?"
        )
    duration = max(s["end"] for s in samples) - min(s["start"] for s in samples)
    tpot = [(s["end"] - s["start"] - s["ttft"]) / (s["tokens"] - 1) for s in ok if s["tokens"] > 1 and s["ttft"]]
    return LoadResult(
        users=users,
        requests=len(ok),
        failures=len(samples) - len(ok),
        duration_s=duration,
        requests_per_s=len(ok) / duration,
        input_tokens_per_s=sum(s["prompt_tokens"] for s in ok) / duration,
        output_tokens_per_s=sum(s["tokens"] for s in ok) / duration,
        ttft_ms=_percentiles([s["ttft"] for s in ok if s["ttft"] is not None]),
        itl_ms=_percentiles([gap for s in ok for gap in s["itl"]]),
        tpot_ms=_percentiles(tpot),
        e2e_ms=_percentiles([s["end"] - s["start"] for s in ok]),
    )


def _percentiles(seconds: list[float]) -> dict[int, float]:
    """Milliseconds at PERCENTILES (linear interpolation); NaN when there are no values."""
    if not seconds:
        return {p: float("nan") for p in PERCENTILES}
    return {p: float(1000 * q) for p, q in zip(PERCENTILES, np.percentile(seconds, PERCENTILES), strict=True)}
