"""A throwaway redis-server for the tests: a free loopback port, its own data folder, stopped by PID.

Used by ``tests/test_redis_engine.py``. Without ``redis-server`` or the ``redis`` package the
tests skip with the reason, except under ``CI=true``, where a missing server fails the run:
a green CI must not hide an untested engine.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

START_TIMEOUT = 10.0


def require_redis() -> str:
    """The path of ``redis-server``; skips (fails under ``CI=true``) when it or redis-py is missing."""
    missing = []
    server = shutil.which("redis-server")
    if server is None:
        missing.append("the redis-server program (apt-get install redis-server)")
    try:
        import redis  # noqa: F401  # only checking that it is installed
    except ImportError:
        missing.append("the redis package (pip install 'mqlite[redis]')")
    if missing:
        reason = "Redis engine tests need " + " and ".join(missing)
        if os.environ.get("CI") == "true":
            pytest.fail(reason + "; CI=true, so a missing server fails the run", pytrace=False)
        pytest.skip(reason)
    assert server is not None
    return server


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextmanager
def redis_server(directory: Path, *extra: str, port: int | None = None) -> Iterator[str]:
    """Run redis-server in ``directory`` on ``port`` (default: a free loopback port); yields its ``redis://`` URL.

    ``extra`` are more server options (``--appendonly yes``, say, overriding the default ``no``).
    """
    import redis

    executable = require_redis()
    port = _free_port() if port is None else port
    log = (directory / "redis.log").open("wb")
    process = subprocess.Popen(
        [
            executable,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--dir", str(directory),
            "--save", "",
            "--appendonly", "no",
            "--maxmemory-policy", "noeviction",
            *extra,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    server_process = process
    try:
        client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=0.5, socket_connect_timeout=0.5)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"redis-server did not start on port {port}: {(directory / 'redis.log').read_text()}"
                    ) from None
                try:
                    process.wait(timeout=0.05)  # bounded pause between PINGs; returns early if it died
                except subprocess.TimeoutExpired:
                    pass
        client.close()
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        if server_process.poll() is None:
            server_process.terminate()
        try:
            server_process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server_process.kill()
            server_process.wait(timeout=10)
        log.close()
