"""The pruning settings a user names on a command line or in a request: torch-free, so that `--help` and
argument checks do not import torch (pruning/methods.py and pruning/redundancy.py define what each means)."""

BASELINES = ("frequency", "reap", "random")
METHODS = ("pes", *BASELINES)
BUDGETS = ("uniform", "adaptive")
HANDLINGS = ("repick", "redirect")
