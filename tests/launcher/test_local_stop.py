"""LocalCluster.stop: children drain on SIGTERM; a second Ctrl-C ends the drains at once,
except the gateway's, which meters the streams that ends and exits by itself."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from services.launcher.local import Child, ClusterConfig, LocalCluster

# Counts SIGTERMs into a file; exits once it has had ``argv[2]`` of them, ``argv[3]`` s later.
CHILD = """
import signal, sys, threading, time, pathlib, os
out, needed, delay = pathlib.Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
count = 0
def on_term(*_):
    global count
    count += 1
    out.write_text(str(count))
    if count == needed:
        threading.Timer(delay, lambda: os._exit(0)).start()
signal.signal(signal.SIGTERM, on_term)
print("ready", flush=True)
while True:
    time.sleep(0.02)
"""


def _child(name: str, tmp: Path, needed: int, delay: float) -> Child:
    process = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp / name), str(needed), str(delay)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout.readline() == "ready\n"
    return Child(name, 0, process)


def test_a_second_ctrl_c_ends_the_drains_but_spares_the_gateway(tmp_path: Path) -> None:
    draining_worker = _child("decode-0", tmp_path, needed=2, delay=0.0)  # drains until told
    gateway = _child("gateway", tmp_path, needed=1, delay=1.5)  # settles, then exits
    cluster = LocalCluster(ClusterConfig(drain_timeout_s=30.0))
    cluster.children = [draining_worker, gateway]
    main = threading.main_thread().ident
    ctrl_c = threading.Timer(0.5, lambda: signal.pthread_kill(main, signal.SIGINT))
    started = time.monotonic()
    ctrl_c.start()
    try:
        cluster.stop()
    finally:
        ctrl_c.cancel()
    assert time.monotonic() - started < 5  # not the 35 s the drain timeout allows
    assert (tmp_path / "decode-0").read_text() == "2"
    assert (tmp_path / "gateway").read_text() == "1"
    assert [c.process.returncode for c in cluster.children] == [0, 0]  # none killed
