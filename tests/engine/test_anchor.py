"""engine.anchor's plot from a saved run (the llama.cpp side needs a build the tests do not make)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.anchor import main


def test_a_saved_run_redraws_as_a_png(tmp_path: Path) -> None:
    samples = {
        "moe-serve": {"1": [900.0, 1200.0, 1100.0], "8": [3000.0, 3600.0]},
        "m-bf16.gguf": {"1": [3500.0], "8": [3000.0]},
        "m-q8_0.gguf": {"1": [4000.0]},  # a file run at batch 1 only (llama-batched-bench cannot run it here)
    }
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"threads": 2, "dtype": "bfloat16", "samples": samples}))
    main(["--plot", str(tmp_path / "anchor.png"), "--from-json", str(run)])
    assert (tmp_path / "anchor.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_a_saved_run_it_needs_the_model_and_llama_cpp() -> None:
    with pytest.raises(SystemExit):
        main(["--plot", "x.png"])
