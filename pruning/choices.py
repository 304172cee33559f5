"""The pruning budgets and handlings a user names on a command line or in a request: torch-free, so that `--help`
and argument checks do not import torch (pruning/methods.py and pruning/redundancy.py define what each means; the
method names are pruning.methods.METHODS' keys, torch-free as well)."""

BUDGETS = ("uniform", "adaptive")
HANDLINGS = ("repick", "redirect")
