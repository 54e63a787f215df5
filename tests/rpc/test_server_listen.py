"""A server whose address is taken says so, naming it and the flag to change, as an error
the CLI prints in one line (grpcio raises a bare RuntimeError with a traceback)."""

from __future__ import annotations

import asyncio
import socket

import pytest

from services.engine.errors import TandemError
from services.rpc.server import ListenError, start_server


def test_a_taken_port_is_a_listen_error_naming_it() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(ListenError) as refused:
            asyncio.run(start_server([], host="127.0.0.1", port=port))
    message = str(refused.value)
    assert message.startswith(f"cannot listen on 127.0.0.1:{port}: the port is taken")
    assert "pick another --port" in message
    assert isinstance(refused.value, TandemError) and isinstance(refused.value, OSError)
