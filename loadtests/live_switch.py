"""How long a live routing switch takes under load, and whether any request fails across it.

`python -m loadtests.live_switch [MODEL] [--users 8] [--switches 20] [--threads 1] [--prune-level L]
[--releases-experts] [--enforce-eager]`

Starts moe-serve with the admin API and the similarity maps, keeps --users streaming clients busy, and meanwhile
cycles the routing budget through substitution on/off and a threshold on/off (and static pruning at --prune-level
on/off) with POST /v1/routing, after one untimed round (it makes and caches any plan), timing each round trip (HTTP plus the wait for the engine's next step boundary). Prints the median and largest switch time,
the requests completed and the failures among them.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from server.launch import launched

SETTINGS: list[dict[str, Any]] = [
    {"substitution": {"keep_top": 1, "min_similarity": 0.1}},
    {"substitution": None},
    {"route_threshold": 0.1},
    {"route_threshold": 0.0},
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtests.live_switch", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, nargs="?", default=Path("models/tiny-simbal"))
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--switches", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="the engine's torch threads")
    parser.add_argument(
        "--prune-level", type=float, help="also switch static pruning (--prune-method at this level) on and off"
    )
    parser.add_argument("--prune-method", default="pes")
    parser.add_argument(
        "--releases-experts",
        action="store_true",
        help="serve with --live-pruning-releases-experts: pruning switches free and read back expert weights",
    )
    parser.add_argument("--enforce-eager", action="store_true", help="serve the eager forward (the reference)")
    args = parser.parse_args(argv)
    settings = list(SETTINGS)
    if args.prune_level:
        settings += [{"prune_level": args.prune_level, "prune_method": args.prune_method}, {"prune_level": 0.0}]
    serve = ["--model", str(args.model), "--threads", str(args.threads), "--enable-admin-api", "--similarity-maps",
             "--log-level", "warning"]  # fmt: skip
    serve += ["--live-pruning-releases-experts"] if args.releases_experts else []
    serve += ["--enforce-eager"] if args.enforce_eager else []
    with launched(serve, ready_timeout=600) as server:
        stop, lock = threading.Event(), threading.Lock()
        counts = {"requests": 0, "failures": 0}

        def user() -> None:
            body = {"prompt": "And the king said", "max_tokens": 64, "ignore_eos": True, "stream": True}
            with httpx.Client(base_url=server.url, timeout=120) as client:
                while not stop.is_set():
                    try:
                        response = client.post("/v1/completions", json=body)
                        text = response.text
                        failed = response.status_code != 200 or not text.rstrip().endswith("data: [DONE]")
                    except httpx.HTTPError:  # a timeout included: it counts, and the user goes on
                        text, failed = "", True
                    with lock:
                        counts["requests"] += 1
                        counts["failures"] += failed or '"error"' in text

        users = [threading.Thread(target=user) for _ in range(args.users)]
        for thread in users:
            thread.start()
        seconds: list[tuple[float, bool]] = []  # (round trip, whether it switched pruning)
        with httpx.Client(base_url=server.url, timeout=600) as admin:  # the untimed first round may make a plan
            while counts["requests"] < args.users:  # every user past its first request
                time.sleep(0.1)
            for i in range(-len(settings), args.switches):  # one untimed round first: a plan made now is cached
                start = time.perf_counter()
                response = admin.post("/v1/routing", json=settings[i % len(settings)])
                if i >= 0:
                    seconds.append((time.perf_counter() - start, "prune_level" in settings[i % len(settings)]))
                if response.status_code != 200:
                    raise RuntimeError(f"switch {i} refused: {response.text}")
                time.sleep(0.25)
        stop.set()
        for thread in users:
            thread.join()
    for kind, prunes in (("routing budget", False), ("pruning", True)):
        times = [s for s, pruning in seconds if pruning == prunes]
        if times:
            print(f"{len(times)} {kind} switches under {args.users} streaming users: median "
                  f"{statistics.median(times) * 1e3:.1f} ms, largest {max(times) * 1e3:.1f} ms")  # fmt: skip
    print(f"{counts['requests']} requests during the switches, {counts['failures']} failed")


if __name__ == "__main__":
    main()
