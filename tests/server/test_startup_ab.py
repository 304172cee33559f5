"""server.startup_ab against itself: real moe-serve processes, each timed from spawn to ready, a ratio per round."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.startup_ab import main

CHECKOUT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # two moe-serve processes
def test_a_checkout_against_itself_prints_seconds_and_a_ratio_per_round(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    saved = tmp_path / "starts.json"
    main([str(CHECKOUT), "--start", "fresh", "--rounds", "1", "--json", str(saved), "--",
          "--model", str(tiny_model), "--enforce-eager", "--threads", "1"])  # fmt: skip
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines() if line.startswith(("| 1 |", "| median"))]
    assert len(rows) == 2
    this, other, ratio = (float(cell.strip().removesuffix("x")) for cell in rows[0][2:5])
    recorded = json.loads(saved.read_text())
    assert recorded["start"] == "fresh" and len(recorded["this"]) == len(recorded["other"]) == 1
    seconds = recorded["this"][0], recorded["other"][0]  # the table rounds them to 0.1 s, the ratio to 0.01
    assert this == pytest.approx(seconds[0], abs=0.051) and other == pytest.approx(seconds[1], abs=0.051)
    assert seconds[0] > 0 and seconds[1] > 0 and ratio == pytest.approx(seconds[0] / seconds[1], abs=0.0051)


def test_a_directory_that_is_not_a_checkout_or_no_rounds_is_refused_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main([str(tmp_path)])
    assert f"{tmp_path} is not a moe-serve checkout" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(CHECKOUT), "--rounds", "0"])
    assert "--rounds must be at least 1, not 0" in capsys.readouterr().err
