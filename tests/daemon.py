"""Run the gateway daemon as a real subprocess (``python -m gateway serve``) for crash, signal
and benchmark runs."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parents[1]


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table (in a list: [[api.keys]] as api.keys = [{...}])
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(type(value))


def write_toml(path: Path, data: dict[str, Any]) -> Path:
    """Write settings ``data`` (tables of scalars, one level of sub-tables, ``targets`` list) as TOML."""
    lines: list[str] = []

    def table(name: str, values: dict[str, Any]) -> None:
        scalars = {k: v for k, v in values.items() if not isinstance(v, dict)}
        lines.append(f"[{name}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in scalars.items())
        for k, v in values.items():
            if isinstance(v, dict):
                table(f"{name}.{k}", v)

    for name, values in data.items():
        if name == "targets":
            for target in values:
                lines.append("[[targets]]")
                lines.extend(f"{k} = {_toml_value(v)}" for k, v in target.items())
        elif isinstance(values, dict):
            table(name, values)
    path.write_text("\n".join(lines) + "\n")
    tomllib.loads(path.read_text())  # fail here, not in the daemon, if this writer got it wrong
    return path


class GatewayProcess:
    """``python -m gateway serve --config <toml>``; stderr goes to ``log_path``. ``cwd``: the
    source tree to run (default: this repository; benchmarks run an earlier commit's too)."""

    def __init__(self, config: Path, port: int, log_path: Path, cwd: Path = REPO):
        self.cwd = cwd
        self.config = config
        self.port = port
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self, timeout: float = 20.0) -> None:
        """Start the daemon and wait until ``/healthz`` answers."""
        env = {k: v for k, v in os.environ.items() if not k.upper().startswith("GATEWAY_")}
        env["PYTHONUNBUFFERED"] = "1"
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(self.config)],
                                     cwd=self.cwd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)
        log.close()
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"daemon exited with {self.proc.returncode}: {self.log_tail()}")
                try:
                    async with http.get(f"{self.url}/healthz") as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
        raise TimeoutError(f"daemon did not start: {self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL: a crash, no cleanup at all."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    async def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; return the exit status."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                self.proc.kill()
                raise TimeoutError(f"daemon ignored SIGTERM: {self.log_tail()}")
            await asyncio.sleep(0.05)
        return self.proc.returncode

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""
