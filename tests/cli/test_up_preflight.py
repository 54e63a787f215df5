"""What `tandem up` checks before it changes anything: free ports, a state directory of its
own, and a start failure said in one message (each was a traceback, and a second run on a
taken port revoked the running cluster's admin key before failing)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from services.cli.main import main
from services.cli.up_preflight import check_port_free, lock_state_dir, start_failed
from services.engine.errors import InvalidRequestError


def _held_port() -> tuple[socket.socket, int]:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    return holder, holder.getsockname()[1]


def test_a_taken_port_is_refused_naming_the_flag() -> None:
    holder, port = _held_port()
    with holder, pytest.raises(InvalidRequestError) as refused:
        check_port_free(port, "--http-port")
    assert str(refused.value).startswith(f"--http-port: port {port} is taken on 127.0.0.1")
    check_port_free(0, "--port")  # 0: a free one is picked later


def test_a_port_whose_old_connections_linger_is_free() -> None:
    """A stopped `tandem up` whose clients were still connected leaves its port's
    connections in TIME_WAIT for a minute; gRPC binds it (SO_REUSEADDR), and the check
    refused it, saying "another tandem up?" with nothing listening."""
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as a gRPC server listens
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = holder.accept()
    accepted.close()  # the server side closes first: its end waits in TIME_WAIT
    client.recv(1)
    client.close()
    holder.close()
    check_port_free(port, "--port")


def test_up_with_both_apis_on_one_port_is_refused_before_starting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each port alone was free, so the gateway failed to bind after the workers loaded."""
    argv = ["up", "--port", "23999", "--http-port", "23999", "--state-dir", str(tmp_path)]
    assert main(argv) == 2
    assert "error: --http-port: must differ from --port (23999)" in capsys.readouterr().err
    assert not (tmp_path / "up.lock").exists()


def test_up_on_a_taken_port_stops_before_touching_its_state(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    holder, port = _held_port()
    with holder:
        status = main(["up", "--port", str(port), "--state-dir", str(tmp_path / "state")])
    err = capsys.readouterr().err
    assert status == 2 and f"error: --port: port {port} is taken" in err
    assert "Traceback" not in err
    assert not (tmp_path / "state").exists()  # no store opened, no admin key revoked


def test_a_state_dir_in_use_is_refused_with_its_holders_pid(tmp_path: Path) -> None:
    held = lock_state_dir(tmp_path / "state")
    try:
        with pytest.raises(InvalidRequestError) as refused:
            lock_state_dir(tmp_path / "state")
        assert "is in use by a running tandem up (pid " in str(refused.value)
    finally:
        held.close()
    lock_state_dir(tmp_path / "state").close()  # free again once its holder is gone


def test_a_state_dir_that_cannot_be_made_names_the_flag(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(InvalidRequestError) as refused:
        lock_state_dir(tmp_path / "file" / "state")
    assert str(refused.value).startswith(f"--state-dir: cannot use {tmp_path / 'file' / 'state'}")


def test_a_start_failure_carries_the_last_line_of_the_childs_log(tmp_path: Path) -> None:
    log = tmp_path / "gateway.log"
    log.write_text("starting\nerror: --policy: invalid TOML at line 3\n\n")
    error = RuntimeError(f"gateway exited with status 2 while starting; its output is in {log}")
    assert str(start_failed(error)).endswith("last line: error: --policy: invalid TOML at line 3")
