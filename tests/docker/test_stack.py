"""The Dockerfile, the compose file and the Grafana provisioning checked against each other and against the code
they deploy: the server's real argument parser, the package list, the paths the code reads and writes, and the
names of the compose services Prometheus and Grafana reach."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from packaging.requirements import Requirement

from corpus.splits import DEFAULT_CORPUS_DIR
from engine.config import DEFAULT_MODEL_DIR
from server.cli import parse_args
from tests.docker.deploy_files import (
    COMPOSE,
    DASHBOARD,
    DOCKER,
    DOCKERFILE,
    DOCKERIGNORE,
    GRAFANA_DATASOURCE,
    GRAFANA_PROVIDER,
    METRIC_NAME,
    NGINX_CONFIG,
    PROMETHEUS_CONFIG,
    REPO,
    dockerfile_stages,
    instructions,
    load_dashboard,
    load_yaml,
    panel_queries,
    require_binary,
    walk_panels,
)
from tests.docker.local_nginx import listen_address, upstream_servers

pytestmark = pytest.mark.slow  # deployment files, compose and promtool

APP = PurePosixPath("/app")


def final_stage() -> list[tuple[str, str]]:
    return dockerfile_stages()[-1]


def build_stage() -> list[tuple[str, str]]:
    (build,) = [stage for stage in dockerfile_stages()[1:-1] if stage[0][1].endswith(" AS build")]
    return build


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    """ENV key=value pairs of a stage (the only ENV form the Dockerfile uses)."""
    return dict(pair.split("=", 1) for args in instructions(stage, "ENV") for pair in shlex.split(args))


def exec_form(args: str) -> list[str]:
    parsed = json.loads(args)
    assert isinstance(parsed, list), f"{args}: use the exec (JSON) form"
    return parsed


def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE)


def service_args(service: dict[str, Any]) -> Any:
    return parse_args(service["command"])


def test_the_image_command_is_what_moe_serve_accepts() -> None:
    stage = final_stage()
    (entrypoint,) = instructions(stage, "ENTRYPOINT")
    (cmd,) = instructions(stage, "CMD")
    assert exec_form(entrypoint) == ["moe-serve"]
    args = parse_args(exec_form(cmd))
    assert args.host == "0.0.0.0"
    assert instructions(stage, "EXPOSE") == [str(args.port)]
    (healthcheck,) = instructions(stage, "HEALTHCHECK")
    probe = exec_form(healthcheck.split(" CMD ", 1)[1])
    assert probe[0] == "python" and f"http://127.0.0.1:{args.port}/ready" in probe[-1]


def test_the_image_runs_as_a_non_root_user_that_can_write_what_the_server_writes() -> None:
    stage = final_stage()
    users = instructions(stage, "USER")
    assert users, "the image must not run as root"
    uid = users[-1].split(":")[0]
    assert uid not in ("root", "0")
    runs = " ".join(instructions(stage, "RUN"))
    assert f"--uid {uid}" in runs
    cache = env_of(stage)["MOE_SERVE_CACHE"]
    assert json.loads(instructions(stage, "VOLUME")[-1]) == [cache]
    # Pruning writes its calibrations and plans under $MOE_SERVE_CACHE and the corpus's token cache beside the
    # corpus (corpus/tokens.py): both must belong to the user.
    token_cache = APP / (DEFAULT_CORPUS_DIR / ".tokens").relative_to(REPO).as_posix()
    chowned = re.findall(r"chown (\S+) ((?:/\S+ ?)+)", runs)
    owned = {path for owner, paths in chowned for path in paths.split()}
    assert {cache, str(token_cache)} <= owned, chowned
    # The user reads the source tree and the bundled models whatever modes the build context had (safetensors
    # writes checkpoints 0600), so the build stage opens /app up after its last COPY.
    build = build_stage()
    last_copy = max(i for i, (keyword, _) in enumerate(build) if keyword == "COPY")
    assert any(key == "RUN" and "chmod -R a+rX /app" in args for key, args in build[last_copy:])


def test_torch_is_installed_first_and_pinned_for_the_project_install() -> None:
    stage = build_stage()
    runs = instructions(stage, "RUN")
    torch_step = next(i for i, run in enumerate(runs) if '"torch==${TORCH_VERSION}"' in run)
    assert "--index-url" in runs[torch_step]
    project_step = next(i for i, run in enumerate(runs) if "-e /app" in run)
    assert torch_step < project_step and "--constraint" in runs[project_step]
    version = next(args.split("=", 1)[1] for args in instructions(stage, "ARG") if args.startswith("TORCH_VERSION="))
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (torch,) = [Requirement(dep) for dep in dependencies if Requirement(dep).name == "torch"]
    assert torch.specifier.contains(version), f"TORCH_VERSION={version} is outside the project's {torch}"


def dockerignore_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex: `**/` any leading directories, `*` and `?` within one path element."""
    parts = re.split(r"(\*\*/|\*\*|\*|\?)", pattern)
    wildcards = {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}
    return re.compile("".join(wildcards.get(part, re.escape(part)) for part in parts))


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether a path or one of its parents matches a .dockerignore exclusion (no `!` re-inclusions are used)."""
    parts = PurePosixPath(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(dockerignore_regex(pattern).fullmatch(prefix) for prefix in prefixes for pattern in patterns)


def test_the_image_holds_everything_the_package_reads_from_its_source_tree() -> None:
    patterns = [line for line in DOCKERIGNORE.read_text().splitlines() if line and not line.startswith("#")]
    assert not any(pattern.startswith("!") for pattern in patterns)
    copied: dict[str, PurePosixPath] = {}
    workdir = PurePosixPath("/")
    for keyword, args in build_stage():
        if keyword == "WORKDIR":
            workdir = workdir / args
        if keyword == "COPY":
            *sources, dest = args.split()
            for source in sources:
                assert (REPO / source).exists(), f"COPY {source}: not in the repository"
                assert not ignored(source, patterns), f"COPY {source}: excluded by {DOCKERIGNORE.name}"
                target = workdir / dest
                copied[source] = target / source if dest.endswith("/") else target
    assert all(target == APP / source for source, target in copied.items()), copied
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    needed = {"pyproject.toml", project["project"]["readme"], *project["tool"]["setuptools"]["packages"]}
    needed |= {path.relative_to(REPO).parts[0] for path in (DEFAULT_MODEL_DIR, DEFAULT_CORPUS_DIR)}
    assert needed <= set(copied)
    for default in (DEFAULT_MODEL_DIR, DEFAULT_CORPUS_DIR):
        assert not ignored(default.relative_to(REPO).as_posix(), patterns)
    assert ignored("data/corpus/.tokens", patterns) and ignored("engine/__pycache__", patterns)


def test_the_compose_servers_run_the_image_command_on_loopback_ports() -> None:
    services = compose()["services"]
    (cmd,) = instructions(final_stage(), "CMD")
    for name in ("moe-serve", "moe-serve-gpu"):
        service = services[name]
        assert (COMPOSE.parent / service["build"]["context"]).resolve() == REPO
        assert REPO / service["build"]["dockerfile"] == DOCKERFILE
        args = service_args(service)
        assert service["command"] == exec_form(cmd) and args.host == "0.0.0.0"
        assert [port.rsplit(":", 1)[1] for port in service["ports"]] == [str(args.port)]
        assert f"127.0.0.1:{args.port}/ready" in service["healthcheck"]["test"][-1]
        assert "MOE_SERVE_API_KEY" in service["environment"]
        assert f"moe-serve-cache:{env_of(final_stage())['MOE_SERVE_CACHE']}" in service["volumes"]
    gpu = services["moe-serve-gpu"]
    assert gpu["profiles"] == ["gpu"] and "profiles" not in services["moe-serve"]
    assert "/whl/cu" in gpu["build"]["args"]["TORCH_INDEX"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]


def test_every_published_port_is_on_loopback_and_every_mount_exists() -> None:
    document = compose()
    for name, service in document["services"].items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name}: {port} is published beyond loopback"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE.parent / source).exists(), f"{name}: mounts missing {source}"
            else:
                assert source in document["volumes"], f"{name}: undeclared volume {source}"
    assert document["services"]["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"
    assert "healthcheck" in document["services"]["prometheus"]


def mount_target(service: dict[str, Any], source: Path) -> str:
    (target,) = [
        volume.split(":")[1]
        for volume in service["volumes"]
        if volume.startswith(".") and (COMPOSE.parent / volume.split(":")[0]).resolve() == source
    ]
    return target


def test_prometheus_scrapes_the_compose_servers() -> None:
    services = compose()["services"]
    assert mount_target(services["prometheus"], PROMETHEUS_CONFIG) == "/etc/prometheus/prometheus.yml"
    (job,) = [job for job in load_yaml(PROMETHEUS_CONFIG)["scrape_configs"] if job["job_name"] == "moe-serve"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [target for group in job["static_configs"] for target in group["targets"]]
    assert sorted(targets) == sorted(
        f"{name}:{service_args(services[name]).port}" for name in services if name.startswith("moe-serve")
    )


def test_the_replicas_profile_puts_nginx_in_front_of_two_copies_of_the_server() -> None:
    services = compose()["services"]
    nginx, second = services["nginx"], services["moe-serve-2"]
    assert nginx["profiles"] == ["replicas"] and second["profiles"] == ["replicas"]
    first = services["moe-serve"]
    assert (second["build"], second["image"], second["command"]) == (first["build"], first["image"], first["command"])
    assert "ports" not in second  # clients go through nginx
    assert mount_target(nginx, NGINX_CONFIG) == "/etc/nginx/nginx.conf"
    config = NGINX_CONFIG.read_text()
    replicas = list(nginx["depends_on"])
    assert replicas == ["moe-serve", "moe-serve-2"]
    assert all(nginx["depends_on"][name]["condition"] == "service_healthy" for name in replicas)
    assert upstream_servers(config) == [f"{name}:{service_args(services[name]).port}" for name in replicas]
    (port,) = nginx["ports"]
    assert port.rsplit(":", 1)[1] == listen_address(config)
    # Spread by open requests, passive health checks, streams not buffered, room for long generations.
    for directive in ("least_conn;", "max_fails=", "proxy_buffering off;", "proxy_read_timeout 600s;"):
        assert directive in config, directive


def test_grafana_provisions_the_data_source_and_the_dashboard_every_panel_uses() -> None:
    grafana = compose()["services"]["grafana"]
    provisioning = mount_target(grafana, DOCKER / "grafana" / "provisioning")
    assert provisioning == "/etc/grafana/provisioning"
    (datasource,) = load_yaml(GRAFANA_DATASOURCE)["datasources"]
    prometheus_port = compose()["services"]["prometheus"]["ports"][0].rsplit(":", 1)[1]
    assert datasource["type"] == "prometheus" and datasource["url"] == f"http://prometheus:{prometheus_port}"
    (provider,) = load_yaml(GRAFANA_PROVIDER)["providers"]
    assert provider["type"] == "file"
    assert mount_target(grafana, DASHBOARD.parent) == provider["options"]["path"]
    dashboard = load_dashboard()
    used = [panel.get("datasource") for panel in walk_panels(dashboard["panels"]) if panel["type"] != "row"]
    used += [target["datasource"] for panel in walk_panels(dashboard["panels"]) for target in panel.get("targets", [])]
    used += [variable["datasource"] for variable in dashboard["templating"]["list"]]
    assert used and all(ref == {"type": "prometheus", "uid": datasource["uid"]} for ref in used)
    ids = [panel["id"] for panel in walk_panels(dashboard["panels"])]
    assert len(ids) == len(set(ids))


def test_every_dashboard_query_selects_the_chosen_model_over_grafana_windows() -> None:
    dashboard = load_dashboard()
    assert {variable["name"] for variable in dashboard["templating"]["list"]} >= {"model_name"}
    for title, expr in panel_queries(dashboard):
        selectors = re.findall(r"\bmoe_serve_\w+(\{[^}]*\})?", expr)
        assert selectors and all('model_name=~"$model_name"' in selector for selector in selectors), (title, expr)
        windows = re.findall(r"\[([^\]]+)\]", expr)
        assert set(windows) <= {"$__rate_interval", "$__range"}, (title, expr)
        assert METRIC_NAME.search(expr)


def test_docker_compose_accepts_the_file() -> None:
    docker_compose = require_binary("docker-compose", "docker-compose", "MOE_SERVE_REQUIRE_COMPOSE")
    done = subprocess.run(
        [docker_compose, "-f", str(COMPOSE), "config", "-q"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stdout + done.stderr
