"""`moe-loadtest --live`: every setting on one server per model, switched through the admin API.

A restart per setting (the plain sweep) puts minutes between two settings' runs, and this VM drifts 10-30% in
minutes, so a difference between settings can be drift. Here one moe-serve per model starts with the admin API
(and the similarity maps when a setting substitutes), and the settings take turns in rounds (A B C, A B C,
...) through POST /v1/routing, so drift spreads over all of them; the report gives each setting's median and
range over the rounds. Perplexity is then scored per setting on the same server as generated tokens, several
windows at once (loadtests.perplexity.served_continuation_perplexity): substitution acts on generated tokens
only and depends on the batch, so prompt scoring would not see it.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from engine.config import ModelConfig
from loadtests.locust_run import Workload, run_locust
from loadtests.perplexity import served_continuation_perplexity
from loadtests.report import throughput_plot, write_tables
from loadtests.settings import ServerOptions, Setting, make_plans, result_row, scrape, sweep_record, warm_up
from pruning.cache import DEFAULT_CACHE_DIR
from pruning.data import split_windows
from pruning.spec import CalibrationSpec
from server.launch import launched


def switch(client: httpx.Client, setting: Setting, plan: Path | None) -> None:
    """Make `setting` the server's routing from its next step (RuntimeError with the server's answer if not)."""
    response = client.post("/v1/routing", json=setting.routing_body(plan))
    if response.status_code != 200:
        raise RuntimeError(f"switching to {setting.name} failed: {response.status_code} {response.text[:300]}")


def live_sweep_model(
    model_dir: Path,
    settings: list[Setting],
    plans: dict[Setting, Path],
    users: list[int],
    rounds: int,
    workload: Workload,
    options: ServerOptions,
    ppl_windows: int,
    out: Path,
    progress: tqdm,
) -> list[dict[str, Any]]:
    """Rows for one model: a row per round, setting and user count, each with its setting's perplexity."""
    name = model_dir.resolve().name
    trained = ModelConfig.from_dir(model_dir).router_balancing
    balancing = trained.method if trained else "unknown"
    run_dir = out / "runs" / f"{name}-live"
    run_dir.mkdir(parents=True, exist_ok=True)
    args = [*options.args(model_dir), "--enable-admin-api"]
    if any(s.keep_top is not None for s in settings):
        args.append("--similarity-maps")
    max_len = ModelConfig.from_dir(model_dir).max_position_embeddings
    window_len = min(256, max_len - 1)
    windows = split_windows(model_dir, "test", window_len, ppl_windows * window_len)
    headers = {"Authorization": f"Bearer {options.api_key}"} if options.api_key else {}
    rows: list[dict[str, Any]] = []
    with (
        open(run_dir / "server.log", "w") as log,
        launched(args, options.ready_timeout_s, stdout=log, stderr=subprocess.STDOUT) as server,
        httpx.Client(base_url=server.url, headers=headers, timeout=600) as client,
    ):
        warm_up(server.url, name, 8, options.api_key)
        for round_ in range(rounds):
            for setting in settings:
                switch(client, setting, plans.get(setting))
                for count in users:
                    progress.set_description(f"{name} round {round_ + 1} {setting.name} {count} users")
                    result = run_locust(
                        server.url, count, workload, run_dir, options.api_key, model_dir / "tokenizer.json"
                    )
                    rows.append(result_row(name, balancing, setting, result, scrape(server.url), round_))
                    with open(run_dir / "rows.jsonl", "a") as saved:  # each run kept as it lands
                        saved.write(json.dumps(rows[-1]) + "\n")
                    progress.update()
                    progress.write(
                        f"{name} round {round_ + 1} {setting.name} u={count}: {result.output_tokens_per_s:.1f} tok/s, "
                        f"{result.failures} failed"
                    )
        perplexity = {}
        for setting in settings:
            progress.set_description(f"{name} {setting.name} perplexity")
            switch(client, setting, plans.get(setting))
            scored = served_continuation_perplexity(
                server.url, name, windows, window_len // 2, max(users), options.api_key
            )
            perplexity[setting.name] = scored
            progress.write(f"{name} {setting.name}: perplexity {scored.ppl:.3f} on {scored.tokens} generated tokens")
    for row in rows:
        scored = perplexity[row["setting"]]
        row |= {"perplexity": scored.ppl, "ppl_tokens": scored.tokens}
    return rows


def live_sweep(
    models: list[Path],
    settings: list[Setting],
    users: list[int],
    rounds: int,
    workload: Workload,
    options: ServerOptions,
    out: Path,
    ppl_windows: int = 32,
    spec: CalibrationSpec | None = None,
    cache_dir: Path = DEFAULT_CACHE_DIR,
) -> list[dict[str, Any]]:
    """Every model's settings on one server, switched live in interleaved rounds (loadtests/live_sweep.py);
    returns the rows and writes the tables and the plot to out."""
    for model_dir in models:
        ModelConfig.from_dir(model_dir)
    spec = spec or CalibrationSpec()
    record = sweep_record(users, rounds, workload, options, spec, live=True, ppl_windows=ppl_windows)
    rows: list[dict[str, Any]] = []
    files: list[Path] = []
    with tqdm(total=len(models) * rounds * len(settings) * len(users), unit="run") as progress:
        for model_dir in models:
            plans = make_plans(model_dir, settings, spec, options, out, cache_dir)
            rows += live_sweep_model(
                model_dir, settings, plans, users, rounds, workload, options, ppl_windows, out, progress
            )
            files = write_tables(rows, record, out)
    files.append(throughput_plot(rows, out / "throughput_vs_perplexity.png"))
    print("wrote", ", ".join(str(f) for f in files))
    return rows
