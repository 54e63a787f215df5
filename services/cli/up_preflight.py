"""What `tandem up` checks before it changes anything: its ports are free and its state
directory is its own.

Without these, a second `tandem up` on a taken port failed only when its gateway could not
bind, with a traceback, after it had already revoked the admin key of the run still
serving from the same state directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import IO

from services.engine.errors import InvalidRequestError, TandemError

LOCK_FILE = "up.lock"
"""In the state directory: held (flock) by the `tandem up` using it, for as long as it runs."""


class StartFailed(TandemError):
    """A service `tandem up` started exited while starting (its log says why)."""


def check_public_ports(port: int, http_port: int, gateway: bool) -> None:
    """``--port`` and (with the gateway) ``--http-port`` are free and differ, checked before
    anything starts: else the gateway fails late, after the workers built their engines."""
    check_port_free(port, "--port")
    if gateway:
        if http_port and http_port == port:
            raise InvalidRequestError("--http-port", f"must differ from --port ({port})")
        check_port_free(http_port, "--http-port")


def check_port_free(port: int, flag: str) -> None:
    """InvalidRequestError naming ``flag`` when ``port`` is taken on loopback (0: free)."""
    if port == 0:
        return
    with socket.socket() as probe:
        # As gRPC binds: a port whose old connections linger in TIME_WAIT is free to serve
        # (refused here for a minute after a stop), one with a listener is not.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as exc:
            raise InvalidRequestError(
                flag,
                f"port {port} is taken on 127.0.0.1 ({exc.strerror}; another tandem up?): "
                "stop what holds it, or pick another port (0: a free one)",
            ) from exc


def lock_state_dir(state_dir: Path) -> IO[str]:
    """Create ``state_dir`` (0700) and hold its lock for this process's life; keep the
    returned file open. InvalidRequestError when it cannot be made, or another running
    `tandem up` holds it (whose admin key this run would otherwise revoke)."""
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock = (state_dir / LOCK_FILE).open("a+")
    except OSError as exc:
        raise InvalidRequestError(
            "--state-dir",
            f"cannot use {state_dir} ({exc.strerror or exc}): choose another directory",
        ) from exc
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        lock.seek(0)
        holder = lock.read().strip() or "?"
        lock.close()
        raise InvalidRequestError(
            "--state-dir",
            f"{state_dir} is in use by a running tandem up (pid {holder}): stop it, or "
            "choose another --state-dir",
        ) from exc
    lock.seek(0)
    lock.truncate()
    lock.write(str(os.getpid()))
    lock.flush()
    return lock


def start_failed(error: RuntimeError) -> StartFailed:
    """The launcher's "X exited while starting; its output is in LOG", with LOG's last line
    (usually the reason), as one message instead of a traceback."""
    message = str(error)
    log = message.rsplit("its output is in ", 1)[-1] if "its output is in " in message else ""
    last = ""
    with contextlib.suppress(OSError):
        lines = [line for line in Path(log).read_text().splitlines() if line.strip()]
        last = lines[-1] if lines else ""
    return StartFailed(f"{message}" + (f"\n  last line: {last}" if last else ""))


def forget_temporary_state(state_dir: Path, exit_status: int) -> None:
    """After a clean stop (``exit_status`` 0), remove a state directory this run made for
    itself (no ``--state-dir``): its logs, store and throwaway TLS keys, the CA's private key
    among them, would otherwise pile up in the temporary directory run after run. A run that
    failed keeps it: its logs say why."""
    if exit_status != 0:
        return
    shutil.rmtree(state_dir, ignore_errors=True)
    print(
        f"removed this run's temporary state {state_dir} (--state-dir DIR keeps the logs, "
        "keys and ledger)",
        file=sys.stderr,
    )
