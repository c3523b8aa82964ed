"""The README's walkthrough, run as written: its marked shell blocks against the daemon (``make run``)
and the emulators, in a directory laid out like a fresh clone.

The README marks each executable block with an HTML comment before its fence:

- ``<!-- walkthrough: servers -->``: long-running servers (terminal 1), started in the background;
- ``<!-- walkthrough: gateway -->``: the daemon (terminal 2), started in the background;
- ``<!-- walkthrough: client -->``: commands (terminal 3), run in README order in one bash session
  (``set -euo pipefail``: an undefined variable or a failing command fails the test). A line
  ``# -> ANSWER`` (continued by ``#     ...`` lines) is what the command before it prints: some later
  output line of the same block must match it, ``...`` standing for anything.

The README's fixed ports (8080 gateway, 3000 WAHA, 8090 Graph API, 8000 file server, 8081 sink) are
replaced by free ones, in the blocks and in the copied ``gateway.toml``, so that runs in parallel do
not collide. Finally, the daemon's log must not hold a media link's signature (``sig=``).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO

README = REPO / "README.md"
PORTS = (8080, 3000, 8090, 8000, 8081)
GATEWAY_PORT = 8080
_BLOCK = re.compile(r"<!-- walkthrough: (servers|gateway|client) -->\n```(?:sh|bash)\n(.*?)```", re.DOTALL)


def walkthrough_blocks(text: str) -> list[tuple[str, str]]:
    """The marked blocks of ``text``, in order: ``(kind, shell text)``."""
    return [(m.group(1), m.group(2)) for m in _BLOCK.finditer(text)]


def expectations(block: str) -> list[str]:
    """The ``# -> ...`` answers of a block, continuation lines joined with a space."""
    answers: list[str] = []
    current: str | None = None
    for line in block.splitlines():
        stripped = line.strip()
        if stripped.startswith("# ->"):
            if current is not None:
                answers.append(current)
            current = stripped[4:].strip()
        elif current is not None and stripped.startswith("#") and line.startswith("#    "):
            current += " " + stripped[1:].strip()
        else:
            if current is not None:
                answers.append(current)
            current = None
    if current is not None:
        answers.append(current)
    return answers


def answer_pattern(answer: str) -> re.Pattern[str]:
    """``answer`` as a regular expression for a whole output line; ``...`` matches anything."""
    return re.compile(".*?".join(re.escape(part) for part in answer.split("...")), re.DOTALL)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _substitute(text: str, ports: dict[int, int]) -> str:
    return re.sub(r"(?<![0-9])(" + "|".join(map(str, ports)) + r")(?![0-9])",
                  lambda m: str(ports[int(m.group(1))]), text)


def _wait_for(ports: list[int], proc: subprocess.Popen[bytes], log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    pending = list(ports)
    while pending:
        if proc.poll() is not None:
            raise AssertionError(f"exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
        if time.monotonic() > deadline:
            raise AssertionError(f"ports {pending} not listening:\n{log.read_text(errors='replace')}")
        try:
            socket.create_connection(("127.0.0.1", pending[0]), timeout=0.5).close()
            pending.pop(0)
        except OSError:
            time.sleep(0.05)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the block's process group (bash and everything it started), then SIGKILL."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)
    except ProcessLookupError:
        pass


@pytest.fixture
def clone(tmp_path: Path) -> Path:
    """A directory laid out like a fresh clone after ``make``: the tracked files the walkthrough
    uses, and ``.venv`` (the repository's, linked)."""
    root = tmp_path / "clone"
    root.mkdir()
    for name in ("Makefile", "pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, root / name)
    # "after make": the linked .venv counts as installed from this pyproject.toml, whenever the
    # repository's copy was last touched (a merge or checkout after `make` must not rebuild it)
    os.utime(root / "pyproject.toml", (0, 0))
    for name in ("tests", "scripts"):
        (root / name).symlink_to(REPO / name)
    (root / ".venv").symlink_to(REPO / ".venv")
    return root


def test_the_readme_marks_its_walkthrough_blocks():
    kinds = [kind for kind, _ in walkthrough_blocks(README.read_text())]
    assert kinds[:2] == ["servers", "gateway"] and kinds.count("client") >= 5, kinds
    for _, block in walkthrough_blocks(README.read_text()):
        for answer in expectations(block):
            answer_pattern(answer)  # every shown answer is usable


def test_the_readme_walkthrough_runs_as_written(clone: Path):
    blocks = walkthrough_blocks(README.read_text())
    ports = dict(zip(PORTS, _free_ports(len(PORTS)), strict=True))
    (clone / "gateway.toml").write_text(_substitute((REPO / "gateway.toml").read_text(), ports))
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["PATH"] = f"{clone / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    started: list[subprocess.Popen[bytes]] = []
    gateway_log = clone / "gateway.log"
    try:
        for kind, block in blocks:
            if kind == "client":
                continue
            log = clone / f"{kind}.log"
            with log.open("ab") as out:
                proc = subprocess.Popen(["bash", "-c", _substitute(block, ports)], cwd=clone, env=env,
                                        stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                        start_new_session=True)
            started.append(proc)
            if kind == "servers":
                _wait_for([ports[p] for p in PORTS if p != GATEWAY_PORT], proc, log)
            else:
                _wait_for([ports[GATEWAY_PORT]], proc, log)
                with urllib.request.urlopen(f"http://127.0.0.1:{ports[GATEWAY_PORT]}/readyz", timeout=20) as r:
                    assert r.status == 200
                gateway_log = log

        clients = [block for kind, block in blocks if kind == "client"]
        script = ["set -euo pipefail"]
        for i, block in enumerate(clients):
            script += [f"echo '@@block {i}@@'", _substitute(block, ports)]
        run = subprocess.run(["bash", "-c", "\n".join(script)], cwd=clone, env=env, capture_output=True,
                             text=True, timeout=60)
        assert run.returncode == 0, f"a walkthrough command failed:\n{run.stdout}\n{run.stderr}"
        outputs = re.split(r"^@@block (\d+)@@\n", run.stdout, flags=re.MULTILINE)[1:]
        by_block = {int(outputs[i]): outputs[i + 1] for i in range(0, len(outputs), 2)}
        for i, block in enumerate(clients):
            lines = by_block[i].splitlines()
            for answer in expectations(_substitute(block, ports)):
                pattern = answer_pattern(answer)
                found = next((n for n, line in enumerate(lines) if pattern.fullmatch(line.strip())), None)
                assert found is not None, (f"block {i}: no output line matches the README's answer\n  {answer}\n"
                                           f"output:\n{by_block[i]}\nstderr:\n{run.stderr}")
                lines = lines[found + 1:]
    finally:
        for proc in reversed(started):
            _stop(proc)
    log = gateway_log.read_text(errors="replace")
    assert "/media/m_" in log and "sig=[redacted]" in log  # the daemon served signed links ...
    assert not re.search(r"sig=(?!\[redacted\])", log), [  # ... and logged no signature
        line for line in log.splitlines() if re.search(r"sig=(?!\[redacted\])", line)]
