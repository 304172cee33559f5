"""Time to ready of this checkout against another, side by side: each start is `moe-serve` as its own process
from that checkout, timed from the spawn to the first 200 from /ready; the sides alternate over --rounds (A B,
B A, ...) and the median of the per-round ratios is printed (this VM drifts 10-30% within minutes, so one start
per side measures the drift, not the change).

`python -m server.startup_ab OTHER_CHECKOUT [--this CHECKOUT] [--start fresh|empty-cache|warm] [--rounds 3]`
`[--json PATH] [-- SERVER ARGS...]`

--start says what a start finds: `fresh` is a fresh machine (an empty $MOE_SERVE_CACHE and an empty temp
directory, where inductor keeps its precompiled headers), `empty-cache` an empty $MOE_SERVE_CACHE with the temp
directory as it is, `warm` the cache each side's earlier starts left (one untimed start per side first). Server
arguments after `--` go to both sides (the default model unless they name one).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from engine.bench import progress
from server.launch import launched

STARTS = ("fresh", "empty-cache", "warm")


def time_to_ready(checkout: Path, server_args: list[str], env: dict[str, str], log: Path) -> float:
    """Seconds from spawning `checkout`'s moe-serve to its first ready answer (then it is stopped)."""
    with log.open("w") as output:
        start = time.perf_counter()
        with launched(server_args, ready_timeout=600.0, cwd=checkout, env=env, stdout=output, stderr=output):
            return time.perf_counter() - start


class Side:
    """One checkout's starts: the environment each gets, by --start, under a work directory of its own."""

    def __init__(self, name: str, checkout: Path, start: str, work: Path) -> None:
        self.name, self.checkout, self.start, self.work = name, checkout, start, work
        self.runs = 0

    def env(self) -> dict[str, str]:
        """The next start's environment: its own empty directories unless warm."""
        self.runs += 1
        run = self.work / (self.name if self.start == "warm" else f"{self.name}-{self.runs}")
        env = {**os.environ, "PYTHONPATH": str(self.checkout), "MOE_SERVE_CACHE": str(run / "cache")}
        # Inductor's cache directory is in this process's environment (engine.paths sets it, and inductor writes
        # it back on first use): each server derives its own from its $MOE_SERVE_CACHE instead.
        env.pop("TORCHINDUCTOR_CACHE_DIR", None)
        if self.start == "fresh":
            (run / "tmp").mkdir(parents=True, exist_ok=True)
            env["TMPDIR"] = str(run / "tmp")
        return env

    def time(self, server_args: list[str]) -> float:
        """One timed start; SystemExit with the end of the server's log if it never got ready."""
        env = self.env()
        log = self.work / f"{self.name}-{self.runs}.log"
        try:
            return time_to_ready(self.checkout, server_args, env, log)
        except RuntimeError as exc:
            raise SystemExit(f"{self.name} ({self.checkout}): {exc}\n{log.read_text()[-3000:]}") from exc


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m server.startup_ab", description=__doc__.split("\n\n")[0])
    parser.add_argument("other", type=Path, help="the other checkout (a worktree of another commit)")
    parser.add_argument("--this", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--start", choices=STARTS, default="empty-cache")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the per-round seconds here")
    argv = sys.argv[1:] if argv is None else argv
    ours, server_args = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    args = parser.parse_args(ours)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, not {args.rounds}")
    for checkout in (args.this, args.other):
        if not (checkout / "server" / "cli.py").is_file():
            parser.error(f"{checkout} is not a moe-serve checkout (no server/cli.py)")
    with tempfile.TemporaryDirectory(prefix="startup-ab-") as work:
        checkouts = {"this": args.this.resolve(), "other": args.other.resolve()}
        sides = [Side(name, checkout, args.start, Path(work)) for name, checkout in checkouts.items()]
        if args.start == "warm":
            for side in sides:
                progress(f"untimed start of {side.name} to fill its cache")
                side.time(server_args)
        seconds: dict[str, list[float]] = {side.name: [] for side in sides}
        for round_ in range(args.rounds):
            for side in sides[:: 1 if round_ % 2 == 0 else -1]:
                progress(f"round {round_ + 1}/{args.rounds}: {side.name} ({side.checkout}), {args.start}")
                seconds[side.name].append(side.time(server_args))
                progress(f"{side.name} ready in {seconds[side.name][-1]:.1f} s")
    ratios = [t / o for t, o in zip(seconds["this"], seconds["other"], strict=True)]
    print(f"time to ready (s), {args.start} starts, {args.rounds} alternating rounds, server args {server_args}")
    print("\n| round | this | other | this / other |\n|---:|---:|---:|---:|")
    for round_, (this, other, ratio) in enumerate(zip(seconds["this"], seconds["other"], ratios, strict=True)):
        print(f"| {round_ + 1} | {this:.1f} | {other:.1f} | {ratio:.2f}x |")
    print(
        f"| median | {statistics.median(seconds['this']):.1f} | {statistics.median(seconds['other']):.1f} "
        f"| {statistics.median(ratios):.2f}x |"
    )
    if args.json:
        args.json.write_text(json.dumps({"start": args.start, "server_args": server_args, **seconds}, indent=1))


if __name__ == "__main__":
    main()
