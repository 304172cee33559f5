"""`python -m loadtests.abuse --url URL`: send a running moe-serve the abusive requests of the hardening issue,
one at a time, while another user's stream runs, and print what each cost everyone else.

For each request: its status and how long it took, the largest pause in the other stream while it was handled,
the slowest /health answer meanwhile, and (with --pid) the server's memory afterwards (its processes' RSS).
It talks HTTP only, so it measures any version of the server the same way.
"""

from __future__ import annotations

import argparse
import itertools
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

ABUSES: dict[str, Callable[[], bytes]] = {
    "700k prompts": lambda: b'{"prompt": [' + b",".join([b"[5]"] * 700_000) + b'], "max_tokens": 1}',
    "1M-word prompt": lambda: json.dumps({"prompt": "the " * 1_000_000}).encode(),
    "n=64, 60k stop strings": lambda: json.dumps({"prompt": "x", "n": 64, "stop": ["~"] * 60_000}).encode(),
    "lone surrogate": lambda: b'{"prompt": "a\\ud800"}',
    "8 prompts x n=64": lambda: json.dumps({"prompt": ["a"] * 8, "n": 64}).encode(),
}


@dataclass
class Outcome:
    name: str
    status: int
    seconds: float
    largest_gap_s: float
    slowest_health_s: float
    rss_mib: float | None
    message: str


def rss_mib(pid: int) -> float:
    """Resident memory of a process and all its descendants, MiB."""
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            for task in Path(f"/proc/{current}/task").iterdir():
                stack += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        total += next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    return total / 1024


def run_one(url: str, name: str, body: bytes, pid: int | None) -> Outcome:
    arrivals: list[float] = []
    health: list[float] = []
    stop = threading.Event()
    started = threading.Event()

    def victim() -> None:
        request = {"prompt": "Once upon a time", "max_tokens": 480, "ignore_eos": True, "stream": True}
        while not stop.is_set():
            with httpx.stream("POST", f"{url}/v1/completions", json=request, timeout=300) as response:
                for line in response.iter_lines():
                    if line.startswith("data: {"):
                        arrivals.append(time.monotonic())
                        started.set()
                    if stop.is_set():
                        return

    def prober() -> None:
        with httpx.Client(base_url=url, timeout=300) as http:
            while not stop.is_set():
                sent = time.monotonic()
                http.get("/health")
                health.append(time.monotonic() - sent)
                time.sleep(0.05)

    threads = [threading.Thread(target=victim, daemon=True), threading.Thread(target=prober, daemon=True)]
    threads[0].start()
    started.wait(60)
    threads[1].start()
    start = time.monotonic()
    with httpx.Client(base_url=url, timeout=600) as http:
        response = http.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    end = time.monotonic()
    time.sleep(0.3)
    stop.set()
    for thread in threads:
        thread.join(600)
    times = [start] + [t for t in arrivals if start < t < end + 0.3] + [end + 0.3]
    gap = max(b - a for a, b in itertools.pairwise(times))
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text[:120]
    return Outcome(name, response.status_code, end - start, gap, max(health, default=0.0),
                   rss_mib(pid) if pid else None, message[:110])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.abuse", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="a running moe-serve")
    parser.add_argument("--pid", type=int, help="the server's process id, to report its memory")
    parser.add_argument("--only", help="comma-separated names of the abuses to send (default: all)")
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else list(ABUSES)
    print(
        "| request | status | took (s) | largest gap in another stream (s) | slowest /health (s) | RSS (MiB) | answer |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in names:
        o = run_one(args.url, name, ABUSES[name](), args.pid)
        rss = f"{o.rss_mib:.0f}" if o.rss_mib is not None else "-"
        print(f"| {o.name} | {o.status} | {o.seconds:.2f} | {o.largest_gap_s:.2f} | {o.slowest_health_s:.2f} | "
              f"{rss} | {o.message} |", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
