from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.kv_transfer.nixl_transport import nixl_available

READY = "PEER READY "
ROOT = Path(__file__).resolve().parents[2]

needs_nixl = pytest.mark.skipif(
    not nixl_available(), reason="NIXL (with its UCX backend) does not work on this host"
)


@dataclass
class Peer:
    process: subprocess.Popen[str]
    port: int
    agent: str

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)
            self.process.kill()
        self.process.wait(timeout=10)


class PeerFactory:
    def __init__(self, log_dir: Path) -> None:
        self.started: list[Peer] = []
        self.log_dir = log_dir

    def start(self, *args: str, timeout_s: float = 30.0) -> Peer:
        """Start tests/kv_transfer/peer.py with ``args``; wait for its JSON line."""
        log_path = self.log_dir / f"peer-{len(self.started)}.log"
        with log_path.open("w") as log:  # the child keeps its own descriptor
            process = subprocess.Popen(
                [sys.executable, "-m", "tests.kv_transfer.peer", *args],
                cwd=ROOT,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
        peer_line = ""
        deadline = time.monotonic() + timeout_s
        while not peer_line and time.monotonic() < deadline and process.poll() is None:
            ready, _, _ = select.select([process.stdout], [], [], 0.1)
            if ready:
                line = process.stdout.readline()
                if line.startswith(READY):  # NIXL logs to stdout too
                    peer_line = line.removeprefix(READY)
        if not peer_line:
            code = process.poll()
            how = f"exited with {code}" if code is not None else f"not ready in {timeout_s:g} s"
            process.kill()
            raise RuntimeError(f"peer {args} did not start ({how}): {log_path.read_text()[-3000:]}")
        info = json.loads(peer_line)
        peer = Peer(process, info["port"], info["agent"])
        self.started.append(peer)
        return peer


@pytest.fixture
def peers(tmp_path: Path) -> Iterator[PeerFactory]:
    factory = PeerFactory(tmp_path)
    yield factory
    for peer in factory.started:
        peer.kill()
