"""The suite's network guard is live: a connection to a public address fails loudly."""

from __future__ import annotations

import socket

import pytest

from tests.conftest import NetworkAccessError


def test_connecting_to_a_public_host_fails_loudly() -> None:
    with pytest.raises(NetworkAccessError, match="must not touch the network"):
        socket.create_connection(("192.0.2.1", 443), timeout=1)


def test_loopback_is_allowed() -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    client = socket.create_connection(server.getsockname(), timeout=1)
    client.close()
    server.close()
