"""free_port: ports no outgoing connection can take before the child binds them."""

from __future__ import annotations

import socket

from services.launcher.local import PORT_FLOOR, _ephemeral_floor, free_port


def test_ports_come_from_below_the_ephemeral_range_never_twice_and_bindable() -> None:
    ports = [free_port() for _ in range(100)]
    assert len(set(ports)) == 100
    assert all(PORT_FLOOR <= p < _ephemeral_floor() for p in ports)
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[-1]))


def test_a_port_in_use_is_never_handed_out() -> None:
    listeners = []
    try:
        for _ in range(50):  # hold 50 handed-out ports; none may come back while held
            s = socket.socket()
            s.bind(("127.0.0.1", free_port()))
            s.listen()
            listeners.append(s)
        held = {s.getsockname()[1] for s in listeners}
        assert not held & {free_port() for _ in range(100)}
    finally:
        for s in listeners:
            s.close()
