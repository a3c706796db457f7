"""nginx for tests: the shipped deploy/nginx.conf, its ports, upstream and certificate
paths substituted, run by the current user under a temporary prefix on 127.0.0.1.

Where nginx is missing the test skips saying so, except in CI (env CI set), where
it fails: `.ci/run` installs nginx."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import pytest
import trio

ROOT = Path(__file__).resolve().parent.parent.parent
SHIPPED = ROOT / "deploy" / "nginx.conf"
START_DEADLINE_S = 10


def nginx_binary() -> str:
    """The nginx executable; skips the test where there is none (fails in CI)."""
    found = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None)
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("nginx is not installed; CI must install it (.ci/run does)")
        pytest.skip("nginx is not installed (apt-get install nginx); the reverse-proxy "
                    "tests need it")
    return found


def free_port() -> int:
    """A port free on 127.0.0.1 right now (nginx cannot report a port 0 it was given)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def site_config(upstream_port: int, https_port: int, http_port: int, certfile: Path,
                keyfile: Path, access_log: Path) -> str:
    """deploy/nginx.conf with loopback ports, the daemon's port, the test's certificate
    and the site's access log at `access_log`.

    Every replaced text must be found exactly once, so a change to the shipped file
    that this test would no longer exercise fails here.
    """
    text = SHIPPED.read_text()
    for old, new in [
        ("listen 80;", f"listen 127.0.0.1:{http_port};"),
        ("listen [::]:80;", ""),
        ("listen 443 ssl;", f"listen 127.0.0.1:{https_port} ssl;"),
        ("listen [::]:443 ssl;", ""),
        ("server 127.0.0.1:8787;", f"server 127.0.0.1:{upstream_port};"),
        ("/etc/ssl/agent-broker/fullchain.pem", str(certfile)),
        ("/etc/ssl/agent-broker/privkey.pem", str(keyfile)),
        ("/var/log/nginx/agent-broker.access.log", str(access_log)),
    ]:
        assert text.count(old) == 1, f"deploy/nginx.conf: expected {old!r} once"
        text = text.replace(old, new)
    return text


def main_config(prefix: Path, site: Path) -> str:
    """The nginx.conf around the site: pid, logs and temporary files under `prefix`."""
    return f"""
pid {prefix}/nginx.pid;
worker_processes 1;
error_log {prefix}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    include {site};
}}
"""


def write_config(prefix: Path, site_text: str) -> Path:
    """The site and the main configuration under `prefix`; the main one's path."""
    prefix.mkdir(parents=True, exist_ok=True)
    site = prefix / "site.conf"
    site.write_text(site_text)
    conf = prefix / "nginx.conf"
    conf.write_text(main_config(prefix, site))
    return conf


@asynccontextmanager
async def run_nginx(prefix: Path, site_text: str, port: int) -> AsyncIterator[trio.Process]:
    """nginx in the foreground with `site_text` as its only site, until the block ends.

    Yields once `port` accepts connections.
    """
    binary = nginx_binary()
    conf = write_config(prefix, site_text)
    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(partial(
            trio.run_process,
            [binary, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log"),
             "-g", "daemon off;"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False))
        try:
            with trio.fail_after(START_DEADLINE_S):
                while True:
                    if process.poll() is not None:
                        raise AssertionError("nginx exited at start:\n"
                                             + (prefix / "error.log").read_text())
                    try:
                        await (await trio.open_tcp_stream("127.0.0.1", port)).aclose()
                        break
                    except OSError:
                        await trio.sleep(0.05)
            yield process
        finally:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)  # fast shutdown
            with trio.move_on_after(START_DEADLINE_S):
                await process.wait()
            if process.returncode is None:
                process.kill()
