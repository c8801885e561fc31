"""A TCP proxy a test puts between one process and a server, to cut that path alone (a network partition):
`cut()` resets every connection and every new one, `hold()` keeps connections open but forwards nothing
(a path that silently drops packets), `restore()` forwards again."""

import socket
import threading
from typing import Self

from tests.conftest import free_port


class TcpProxy:
    """Listens on 127.0.0.1:<port> and forwards to 127.0.0.1:<target_port> while open."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.mode = "open"
        self._connections: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, database: int = 0) -> str:
        """redis:// URL through the proxy."""
        return f"redis://127.0.0.1:{self.port}/{database}"

    def cut(self) -> None:
        """Reset every connection; new ones are reset as they come."""
        self._switch("cut")

    def hold(self) -> None:
        """Nothing goes through (sent bytes are dropped); connections stay open, new ones are accepted."""
        self._switch("hold")

    def restore(self) -> None:
        """Forward again (connections cut off or held meanwhile are closed: clients reconnect)."""
        self._switch("open")

    def close(self) -> None:
        """Stop listening and close everything."""
        self._closed = True
        self._switch("cut")
        self._listener.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _switch(self, mode: str) -> None:
        with self._lock:
            self.mode = mode
            connections, self._connections = self._connections, []
        for connection in connections:
            reset(connection)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _address = self._listener.accept()
            except OSError:
                return
            with self._lock:
                mode = self.mode
                if mode != "cut":
                    self._connections.append(client)
            if mode == "cut":
                reset(client)
            elif mode == "hold":
                threading.Thread(target=drain, args=(client,), daemon=True).start()
            else:
                try:
                    upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=2)
                except OSError:
                    reset(client)
                    continue
                upstream.settimeout(None)
                with self._lock:
                    self._connections.append(upstream)
                threading.Thread(target=pump, args=(client, upstream), daemon=True).start()
                threading.Thread(target=pump, args=(upstream, client), daemon=True).start()


def pump(source: socket.socket, target: socket.socket) -> None:
    """Copy bytes until either side closes."""
    try:
        while data := source.recv(65536):
            target.sendall(data)
    except OSError:
        pass
    reset(source)
    reset(target)


def drain(connection: socket.socket) -> None:
    """Read and drop everything until the connection closes."""
    try:
        while connection.recv(65536):
            pass
    except OSError:
        pass


def reset(connection: socket.socket) -> None:
    """Close at once (RST, not FIN: the peer's next call fails instead of reading an end of file)."""
    try:
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        connection.close()
    except OSError:
        pass
