"""Real object stores on loopback for the tests: moto's S3-compatible server and plain HTTP file servers.

Nothing here stands in for fsspec or boto: the loader talks to these servers over TCP as it would to AWS or a
web server, and the tests put and rewrite objects through the same protocol (boto3 against the S3 server).
"""

from __future__ import annotations

import contextlib
import email.utils
import gzip
import http.server
import io
import os
import re
import socket
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

#: Credentials the S3 server accepts (moto checks none; the loader must still find some, as with AWS).
S3_KEY_ID = "AKIAOBJECTSTORETEST1"
S3_SECRET = "objstore-test-secret-Zq8vKp3LmN"


@contextlib.contextmanager
def s3_server(host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """moto's S3 server in a thread of this process; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    from .helpers import free_port

    server = ThreadedMotoServer(ip_address=host, port=port or free_port(), verbose=False)
    server.start()
    try:
        yield f"http://{host}:{server._port}"
    finally:
        server.stop()


def s3_client(endpoint: str) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=S3_KEY_ID,
                        aws_secret_access_key=S3_SECRET)


def s3_env(endpoint: str) -> dict[str, str]:
    """The standard AWS variables that point the loader (and its workers) at the server."""
    return {"AWS_ACCESS_KEY_ID": S3_KEY_ID, "AWS_SECRET_ACCESS_KEY": S3_SECRET, "AWS_ENDPOINT_URL": endpoint,
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_CONFIG_FILE": os.devnull}


class Faults:
    """Requests a test wants refused: the next ``unavailable`` ranged GETs are answered 503 Service Unavailable,
    the next ``resets`` ranged GETs have their connection closed before any answer (as a crashed front end)."""

    def __init__(self) -> None:
        self.unavailable = 0
        self.resets = 0
        self.refused = 0
        self._lock = threading.Lock()

    def take(self) -> str | None:
        with self._lock:
            for kind in ("unavailable", "resets"):
                if getattr(self, kind) > 0:
                    setattr(self, kind, getattr(self, kind) - 1)
                    self.refused += 1
                    return kind
        return None


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files with ``Range: bytes=a-b`` answered 206, and an ETag of the file's mtime and size."""

    faults: Faults | None = None
    #: Send the gzip representation to a client that accepts it (``Content-Encoding: gzip``).
    compress = False

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass

    def send_head(self) -> Any:
        fault = self.faults.take() if self.faults is not None and "Range" in self.headers else None
        if fault == "unavailable":
            self.send_error(503, "Service Unavailable")
            return None
        if fault == "resets":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return None
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404, "File not found")
            return None
        st = path.stat()
        f: Any = open(path, "rb")  # noqa: SIM115 - the base class closes it after copying
        size, etag = st.st_size, f'"{st.st_mtime_ns:x}-{st.st_size:x}"'
        encoded = self.compress and "gzip" in self.headers.get("Accept-Encoding", "")
        if encoded:  # the gzip representation, whose bytes a Range counts (as Apache's mod_deflate does)
            body = gzip.compress(f.read(), mtime=0)
            f.close()
            f, size, etag = io.BytesIO(body), len(body), etag[:-1] + '-gzip"'
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        start, end = 0, size - 1
        if m:
            start = int(m.group(1))
            end = min(int(m.group(2)) if m.group(2) else end, size - 1)
            if start >= size:
                f.close()
                self.send_error(416, "Range not satisfiable")
                return None
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        else:
            self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", etag)
        if encoded:
            self.send_header("Content-Encoding", "gzip")
        self.send_header("Last-Modified", email.utils.formatdate(st.st_mtime, usegmt=True))
        self.end_headers()
        f.seek(start)
        return _Limited(f, end - start + 1)


class _Limited:
    """The first ``n`` bytes of a file, for copyfile()."""

    def __init__(self, f: Any, n: int) -> None:
        self.f, self.left = f, n

    def read(self, size: int = -1) -> bytes:
        size = self.left if size < 0 else min(size, self.left)
        data = self.f.read(size)
        self.left -= len(data)
        return bytes(data)

    def close(self) -> None:
        self.f.close()


class _NoRangeHandler(http.server.SimpleHTTPRequestHandler):
    """The standard library's file server: it ignores ``Range`` and always sends the whole file (200)."""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


@contextlib.contextmanager
def http_server(directory: Path, *, ranges: bool, faults: Faults | None = None, compress: bool = False
                ) -> Iterator[str]:
    """An HTTP server for ``directory`` on loopback, honouring ``Range`` or not, refusing what ``faults`` asks,
    sending gzip content-encoding to clients that accept it when ``compress``; yields its base URL."""
    if faults is not None or compress:
        handler = partial(type("_RangeHandlerWith", (_RangeHandler,), {"faults": faults, "compress": compress}),
                          directory=str(directory))
    else:
        handler = partial(_RangeHandler if ranges else _NoRangeHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def serve(directory: Path, port: int, *, ranges: bool = True) -> None:
    """Serve ``directory`` on 127.0.0.1:``port`` until killed (a process of its own: bench/objstore.py)."""
    handler = partial(_RangeHandler if ranges else _NoRangeHandler, directory=str(directory))
    http.server.ThreadingHTTPServer(("127.0.0.1", port), handler).serve_forever()


if __name__ == "__main__":
    import sys

    serve(Path(sys.argv[1]), int(sys.argv[2]))
