"""Engine settings a user names on a command line: torch-free, so that `--help` and argument checks do not
import torch (engine/moe.py implements the backends)."""

# How a MoE layer runs its experts: auto picks the CPU kernel on CPU and grouped_mm elsewhere.
BACKENDS = ("auto", "grouped", "loop")
