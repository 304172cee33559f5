"""The repository's nginx config (docker/nginx/nginx.conf) run by a local nginx: the upstream servers and the
listen address replaced, and every path nginx writes (pid, logs, temporary files) moved into a scratch
directory, so that a test runs the very file compose mounts, as any user."""

from __future__ import annotations

import getpass
import os
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from server.launch import stop

UPSTREAM_BLOCK = re.compile(r"^(\s*upstream\s+\w+\s*\{)(.*?)^(\s*\})", re.MULTILINE | re.DOTALL)
UPSTREAM_SERVER = re.compile(r"^(\s*server\s+)(\S+)((?:\s+[^;\s]+)*;)", re.MULTILINE)
LISTEN = re.compile(r"^(\s*listen\s+)(\S+);", re.MULTILINE)
HTTP_BLOCK = re.compile(r"^http\s*\{\n", re.MULTILINE)
# nginx -V's compiled-in temporary directories (Debian's are under /var/lib/nginx, root's to write).
TEMP_PATH = re.compile(r"--http-([a-z-]+)-temp-path=")


def upstream_servers(config: str) -> list[str]:
    """The addresses of the one upstream block's servers, in order."""
    (block,) = UPSTREAM_BLOCK.findall(config)
    return [address for _, address, _ in UPSTREAM_SERVER.findall(block[1])]


def listen_address(config: str) -> str:
    (address,) = [address for _, address in LISTEN.findall(config)]
    return address


def temp_path_directives(nginx: str) -> list[str]:
    """The `*_temp_path` directives this nginx build knows, as nginx -V lists them."""
    version = subprocess.run([nginx, "-V"], check=True, capture_output=True, text=True, timeout=30).stderr
    return [f"{name.replace('-', '_')}_temp_path" for name in TEMP_PATH.findall(version)]


def local_config(config: str, upstreams: list[str], listen: str, scratch: Path, temp_paths: list[str]) -> str:
    """config with its upstream servers replaced in order by `upstreams` (their parameters kept), its listen
    address by `listen`, and pid, access log and temporary files under scratch."""
    assert len(upstream_servers(config)) == len(upstreams), f"{upstream_servers(config)} for {upstreams}"
    block = UPSTREAM_BLOCK.search(config)
    assert block is not None
    servers = iter(upstreams)
    body = UPSTREAM_SERVER.sub(lambda m: f"{m.group(1)}{next(servers)}{m.group(3)}", block.group(2))
    config = config[: block.start(2)] + body + config[block.end(2) :]
    config, listens = LISTEN.subn(lambda m: f"{m.group(1)}{listen};", config)
    assert listens == 1, f"{listens} listen directives"
    http = [f"    access_log {scratch / 'access.log'};\n"]
    http += [f"    {directive} {scratch / directive};\n" for directive in temp_paths]
    config, blocks = HTTP_BLOCK.subn(lambda m: m.group(0) + "".join(http), config)
    assert blocks == 1, f"{blocks} http blocks"
    main = [f"pid {scratch / 'nginx.pid'};\n"]
    if os.geteuid() == 0:  # workers would otherwise drop to `nobody`, who cannot enter the scratch directory
        main.append(f"user {getpass.getuser()};\n")
    return "".join(main) + config


def wait_listening(port: int, process: subprocess.Popen[bytes], log: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, f"nginx exited with {process.returncode}: {log.read_text()}"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            assert time.monotonic() < deadline, f"nginx did not listen on {port} within {timeout:g} s"
            time.sleep(0.05)


@contextmanager
def running_nginx(nginx: str, config: str, port: int, scratch: Path) -> Iterator[Path]:
    """Run nginx in the foreground on config (which listens on 127.0.0.1:port) until the block ends; yields
    the error log. `nginx -t` checks the config first, so a bad one fails with nginx's own message."""
    scratch.mkdir(parents=True, exist_ok=True)
    path = scratch / "nginx.conf"
    path.write_text(config)
    log = scratch / "error.log"
    command = [nginx, "-p", str(scratch), "-c", str(path), "-e", str(log), "-g", "daemon off;"]
    checked = subprocess.run([*command, "-t"], check=False, capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(port, process, log)
        yield log
    finally:
        stop(process, 10.0)
