"""A loopback TCP forwarder that a fault scenario can break the way networks break.

``tests/tcpproxy.py`` can only refuse (stop listening and reset every connection). A real
partition is quieter: packets vanish, connections stay open and nobody is told, so a client
only notices through its own timeouts. ``FaultProxy`` does both, and can also hold new
connections while the thing behind it is swapped (a database switchover), then forward them
to a new target.

Modes:

* ``forward``: bytes flow both ways.
* ``partition()``: connections stay open and new ones are accepted, but every byte either side
  sends is read and dropped. ``heal()`` closes those connections (after a real partition
  they would be long dead) and forwards again.
* ``refuse()``: stop listening and reset every connection (``restore()`` undoes it).
* ``hold()``: existing connections are cut, new ones are accepted and wait (at most
  ``HOLD_LIMIT`` s) before their upstream is dialled; ``release()`` lets them through, to the
  target of that moment (``retarget`` in between moves them).
"""

from __future__ import annotations

import socket
import threading

#: A held connection gives up (and is closed) after this many seconds.
HOLD_LIMIT = 30.0
FORWARD, PARTITION, HOLD = "forward", "partition", "hold"


class FaultProxy:
    """Forward ``127.0.0.1:<port>`` to ``target``, with faults on demand."""

    def __init__(self, target: tuple[str, int], name: str = "") -> None:
        self.target = target
        self.name = name
        self.port = 0
        self.mode = FORWARD
        self._lock = threading.Lock()
        self._server: socket.socket | None = None
        self._connections: set[socket.socket] = set()
        self._released = threading.Event()
        self._released.set()
        #: Connections accepted so far (a client that reconnects shows up here).
        self.accepted = 0
        self.restore()

    def __repr__(self) -> str:
        return f"<FaultProxy {self.name} :{self.port} -> {self.target[1]} {self.mode}>"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    # ------------------------------------------------------------------ faults

    def restore(self) -> None:
        """Listen (again) on the same port and forward."""
        with self._lock:
            if self._server is not None:
                self.mode = FORWARD
                return
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(64)
        self.port = server.getsockname()[1]
        with self._lock:
            self._server = server
            self.mode = FORWARD
        threading.Thread(target=self._accept, args=(server,), daemon=True,
                         name=f"proxy-accept-{self.name}").start()

    def refuse(self) -> None:
        """Stop listening and reset every connection: the peer is told at once."""
        with self._lock:
            server, self._server = self._server, None
        if server is not None:
            _close(server)
        self.drop_connections()

    def partition(self) -> None:
        """Drop every byte from now on, silently; connections stay open."""
        with self._lock:
            self.mode = PARTITION

    def heal(self) -> None:
        """End a partition: close the connections it swallowed, forward new ones."""
        with self._lock:
            was = self.mode
            self.mode = FORWARD
        if was == PARTITION:
            self.drop_connections()

    def hold(self) -> None:
        """Cut every connection; new ones wait for ``release()``."""
        with self._lock:
            self.mode = HOLD
            self._released.clear()
        self.drop_connections()

    def release(self) -> None:
        with self._lock:
            self.mode = FORWARD
            self._released.set()

    def retarget(self, target: tuple[str, int]) -> None:
        """Send connections made from now on to ``target``."""
        with self._lock:
            self.target = target

    def drop_connections(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, set()
        for conn in connections:
            _close(conn)

    def close(self) -> None:
        self.release()
        self.refuse()

    # ------------------------------------------------------------------ plumbing

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            self.accepted += 1
            with self._lock:
                if self._server is not server:
                    _close(client)
                    return
                self._connections.add(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True,
                             name=f"proxy-conn-{self.name}").start()

    def _serve(self, client: socket.socket) -> None:
        if self.mode == PARTITION:
            self._pump(client, None)  # swallow until healed (heal closes it)
            return
        if not self._released.wait(HOLD_LIMIT):
            self._forget(client)
            return
        try:
            upstream = socket.create_connection(self.target, timeout=5)
            upstream.settimeout(None)
        except OSError:
            self._forget(client)
            return
        with self._lock:
            if client not in self._connections:  # dropped while connecting
                _close(upstream)
                return
            self._connections.add(upstream)
        threading.Thread(target=self._pump, args=(upstream, client), daemon=True,
                         name=f"proxy-pump-{self.name}").start()
        self._pump(client, upstream)

    def _pump(self, source: socket.socket, sink: socket.socket | None) -> None:
        try:
            while data := source.recv(65536):
                if sink is not None and self.mode != PARTITION:
                    sink.sendall(data)
        except OSError:
            pass
        finally:
            self._forget(source)
            if sink is not None:
                self._forget(sink)

    def _forget(self, sock: socket.socket) -> None:
        _close(sock)
        with self._lock:
            self._connections.discard(sock)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
