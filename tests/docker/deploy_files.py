"""Readers for the deployment files under docker/, shared by the structural and the live-Prometheus tests."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
DOCKERIGNORE = DOCKER / "Dockerfile.dockerignore"
COMPOSE = DOCKER / "docker-compose.yml"
PROMETHEUS_CONFIG = DOCKER / "prometheus" / "prometheus.yml"
GRAFANA_DATASOURCE = DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
GRAFANA_PROVIDER = DOCKER / "grafana" / "provisioning" / "dashboards" / "moe-serve.yml"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "moe-serve.json"
NGINX_CONFIG = DOCKER / "nginx" / "nginx.conf"
EPP_FLAGS = DOCKER / "gateway" / "epp-flags.yaml"
DEPLOY_DOC = REPO / "docs" / "deploy.md"

METRIC_NAME = re.compile(r"\bmoe_serve_\w+")
VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")
LABEL_VALUES = re.compile(r"^\s*label_values\((.*),\s*(\w+)\s*\)\s*$", re.DOTALL)


# Debian installs daemons such as nginx in sbin, which an unprivileged user's PATH leaves out.
SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")


def require_binary(name: str, package: str, env: str) -> str:
    """The binary's path; without it a skip, or a failure where CI sets `env`=1 to insist on the check."""
    path = shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", os.defpath), *SBIN]))
    if path is None:
        message = f"{name} is not on PATH (Debian: apt-get install {package})"
        if os.environ.get(env) == "1":
            pytest.fail(f"{message}, and {env}=1 requires it")
        pytest.skip(message)
    return path


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dockerfile_stages(path: Path = DOCKERFILE) -> list[list[tuple[str, str]]]:
    """Instructions as (KEYWORD, arguments) per build stage, continuation lines joined and comments dropped;
    instructions before the first FROM (global ARGs) form stage 0."""
    stages: list[list[tuple[str, str]]] = [[]]
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        pending = ""
        if keyword.upper() == "FROM":
            stages.append([])
        stages[-1].append((keyword.upper(), args.strip()))
    return stages


def instructions(stage: list[tuple[str, str]], keyword: str) -> list[str]:
    return [args for key, args in stage if key == keyword]


def walk_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    for panel in panels:
        yield panel
        yield from walk_panels(panel.get("panels", []))


def panel_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of every panel."""
    return [
        (panel["title"], target["expr"])
        for panel in walk_panels(dashboard["panels"])
        for target in panel.get("targets", [])
    ]


def variable_query(variable: dict[str, Any]) -> str:
    """A query variable's query text (Grafana stores it as a string or as an object with `query`)."""
    query = variable["query"]
    return query["query"] if isinstance(query, dict) else query


def substitute(expr: str, values: dict[str, str]) -> str:
    """Grafana's variable interpolation for `$name` and `${name}`; an unknown variable is an error."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise KeyError(f"unresolved variable ${name} in {expr!r}")
        return values[name]

    return VARIABLE.sub(value, expr)
