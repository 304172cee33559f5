"""What every moe-serve command line shares: defaults shown in --help, a --version, and value checks that name
the flag. Torch-free, so `--help` answers at once."""

from __future__ import annotations

import argparse
import os
from importlib import metadata


def eager_by_default() -> bool:
    """Whether an engine runs its model eagerly when neither --enforce-eager nor EngineConfig.enforce_eager says
    so: $MOE_SERVE_ENFORCE_EAGER=1 (the tests set it; compiled otherwise)."""
    return os.environ.get("MOE_SERVE_ENFORCE_EAGER", "0") == "1"


def version() -> str:
    try:
        return metadata.version("moe-serve")
    except metadata.PackageNotFoundError:
        return "(not installed)"


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions as written (paragraphs, examples), and each option's default after its help."""


def command_parser(prog: str, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """An ArgumentParser that shows each option's default in --help and answers --version."""
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    return parser


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value
