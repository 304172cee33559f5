"""engine.step_ab against itself (one side with an EngineConfig setting, the other with an environment variable):
both sides measured in their own processes, a ratio per batch size."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.step_ab import main

pytestmark = pytest.mark.slow  # compiled engines in fresh processes


def test_a_checkout_against_itself_prints_a_ratio_per_batch(
    tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkout = Path(__file__).resolve().parents[2]
    main([str(checkout), "--model", str(tiny_model), "--dtype", "float32", "--batch-sizes", "1,2", "--rounds", "2",
          "--threads", "1", "--enforce-eager", "--this-config", "live_pruning=true", "--other-env",
          "MOE_SERVE_NATIVE_OPS=0"])  # fmt: skip
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("| 1 |", "| 2 |"))]
    assert len(rows) == 2
    assert all(float(row.split("|")[4].strip().removesuffix("x")) > 0 for row in rows)


def test_a_malformed_config_item_is_refused_naming_it() -> None:
    with pytest.raises(SystemExit, match="'live_pruning' is not FIELD=JSON"):
        main([".", "--this-config", "live_pruning"])
    with pytest.raises(SystemExit, match="'MOE_SERVE_NATIVE_OPS' is not NAME=VALUE"):
        main([".", "--other-env", "MOE_SERVE_NATIVE_OPS"])
