"""Publishing a guest TCP port on the host while the VM runs (:meth:`Vm.expose_tcp`).

Ports given with ``-p`` at start are published by the VM's network backend. A port exposed later
is served here instead: a listener on the host, and for each connection it accepts a fresh agent
connection over vsock whose ``tcp_connect`` request reaches the port inside the guest
(``guest/agent/PROTOCOL.md``). It needs no network card, so it works for VMs without a network
too, and the guest never sees the host peer's address.

Every accepted connection costs two threads; at most :data:`MAX_CONNECTIONS` are relayed at once
per exposed port, and connections beyond that are reset at once, so a flood of host clients
cannot exhaust the caller's threads.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

from supermachine.agent import AgentClient, reset_on_close
from supermachine.errors import NetworkError, SupermachineError

__all__ = ["DEFAULT_HOST", "MAX_CONNECTIONS", "HostAddress", "PortForward"]

log = logging.getLogger(__name__)

#: Where an exposed port listens unless asked otherwise: only this machine can connect.
DEFAULT_HOST = "127.0.0.1"
#: Most connections one exposed port relays at once.
MAX_CONNECTIONS = 256
_BACKLOG = 128
#: Seconds ``close`` waits for its relays to finish.
_CLOSE_WAIT = 10.0


class HostAddress(NamedTuple):
    """Where on the host an exposed guest port is reached."""

    host: str
    port: int


def _port(value: object, what: str, *, zero_ok: bool = False) -> int:
    low = 0 if zero_ok else 1
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 65535:
        raise NetworkError(f"{what} {value!r} is not a port number ({low} to 65535)")
    return value


def _listen(host: str, port: int, guest_port: int) -> socket.socket:
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        raise NetworkError(f"host {host!r} is not an IP address to listen on") from None
    try:
        return socket.create_server((host, port), family=family, backlog=_BACKLOG)
    except OSError as e:
        raise NetworkError(
            f"cannot publish guest port {guest_port} on {host}:{port}: {e.strerror or e}"
        ) from None


class PortForward:
    """One guest port published on the host: a listener and its relays. Close with :meth:`close`."""

    def __init__(
        self,
        connect: Callable[[], AgentClient],
        guest_port: int,
        *,
        host: str = DEFAULT_HOST,
        host_port: int = 0,
    ) -> None:
        self.guest_port = _port(guest_port, "guest port")
        self._connect = connect
        self._listener = _listen(host, _port(host_port, "host port", zero_ok=True), self.guest_port)
        bound = self._listener.getsockname()
        self.address = HostAddress(bound[0], bound[1])
        self._lock = threading.Lock()
        # Each relayed peer, with its agent connection once there is one.
        self._active: dict[socket.socket, AgentClient | None] = {}
        self._relays: set[threading.Thread] = set()
        self._closed = False
        self._thread = threading.Thread(target=self._accept, name=f"expose-{self.guest_port}", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                peer, _ = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                refused = self._closed or len(self._active) >= MAX_CONNECTIONS
                if not refused:
                    self._active[peer] = None
            if refused:
                reset_on_close(peer)
                peer.close()
                continue
            relay = threading.Thread(
                target=self._relay, args=(peer,), name=f"expose-{self.guest_port}-relay", daemon=True
            )
            with self._lock:
                self._relays = {t for t in self._relays if t.is_alive()}
                self._relays.add(relay)
            relay.start()

    def _relay(self, peer: socket.socket) -> None:
        client: AgentClient | None = None
        try:
            client = self._connect()
            with self._lock:
                if self._closed:
                    client.close()
                    return
                self._active[peer] = client
            client.relay_tcp(self.guest_port, peer)
        except (SupermachineError, OSError) as e:
            # The host client sees a reset; why is only worth a log line (a guest service that
            # is not listening yet is an everyday case).
            log.info("guest port %d: %s", self.guest_port, e)
            reset_on_close(peer)
        finally:
            if client is not None:
                client.close()
            with self._lock:
                self._active.pop(peer, None)
            peer.close()

    @property
    def connections(self) -> int:
        """Connections being relayed now."""
        with self._lock:
            return len(self._active)

    def close(self) -> None:
        """Stops listening and ends the connections being relayed. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            active = list(self._active.items())
            relays = list(self._relays)
        # shutdown wakes the thread blocked in accept (close alone does not on Linux).
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for peer, client in active:
            if client is not None:
                client.close()  # the relay ends and resets its peer
            with contextlib.suppress(OSError):
                peer.shutdown(socket.SHUT_RDWR)
        self._thread.join()
        # Each relay ends at once now (its agent connection and peer are shut); waiting is
        # bounded all the same, the threads are daemons.
        deadline = time.monotonic() + _CLOSE_WAIT
        for relay in relays:
            relay.join(max(0.0, deadline - time.monotonic()))
