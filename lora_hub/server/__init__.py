"""A Hub-compatible server (`lora-hub serve`): the embedded default for offline, air-gapped and CI use, and the Hub
the tests talk to with the real huggingface_hub client. The wire protocol is the one huggingface_hub 2.x speaks
(docs/HUB_PROTOCOL.md); storage is objects on disk by sha256 plus SQLite (store.py); the routes are in app.py, the
handlers in reading.py, writing.py and lfs.py, and connections.py bounds how long a connection may idle.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .app import HubApp
from .store import Store

__all__ = ["HubApp", "RunningServer", "Store", "running", "serve", "token_file"]


def token_file(root: str | os.PathLike[str], user: str = "local") -> Path:
    """The write token of `user` kept in ROOT/token (mode 0600), created on first use."""
    path = Path(root) / "token"
    if not path.exists():
        token = Store(root).add_token(user, write=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token)
    return path


def _socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def _server(root: str | os.PathLike[str], multipart_chunk_size: int | None, head_timeout: float | None = None):
    import uvicorn

    from .connections import HEAD_TIMEOUT, bounded_protocol

    options = {} if multipart_chunk_size is None else {"multipart_chunk_size": multipart_chunk_size}
    app = HubApp(Store(root), **options)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", timeout_keep_alive=30,
                            http=bounded_protocol(head_timeout or HEAD_TIMEOUT))
    return uvicorn.Server(config)


def serve(root: str | os.PathLike[str], *, host: str = "127.0.0.1", port: int = 8077,
          multipart_chunk_size: int | None = None, ready: Callable[[str], None] | None = None) -> None:
    """Serves until interrupted. `ready(url)` is called once the socket listens (port 0 picks a free port)."""
    sock = _socket(host, port)
    server = _server(root, multipart_chunk_size)
    url = _url(host, sock.getsockname()[1])
    if ready is not None:
        sock.listen()
        ready(url)
    server.run(sockets=[sock])


@dataclass
class RunningServer:
    """A server started by `running`: its URL and root; `stop()` ends it."""

    url: str
    root: Path
    thread: threading.Thread
    server: Any

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@contextmanager
def running(root: str | os.PathLike[str], *, host: str = "127.0.0.1", port: int = 0,
            multipart_chunk_size: int | None = None, head_timeout: float | None = None) -> Iterator[RunningServer]:
    """A server in a background thread of this process, stopped on exit (the demo's embedded Hub).
    `head_timeout`: seconds a connection may take to send a request head (default 30)."""
    sock = _socket(host, port)
    server = _server(root, multipart_chunk_size, head_timeout)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="lora-hub-server", daemon=True)
    thread.start()
    handle = RunningServer(_url(host, sock.getsockname()[1]), Path(root), thread, server)
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the embedded Hub server failed to start")
            threading.Event().wait(0.01)
        yield handle
    finally:
        handle.stop()
        sock.close()


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
