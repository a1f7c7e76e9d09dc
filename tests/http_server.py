"""A real HTTP server for the tests (Python's http.server in a thread, bound to 127.0.0.1 on a free
port) that serves a directory and misbehaves on request, per file name: answer 503 to the first N
requests, or cut the connection halfway through the body of the first N responses; or never answer
the requests for tar files after the first `answered_tars`, or those for the names in `silent`
(until the server stops). Missing files
get 404 as from any server. Every request is counted per file name."""

from __future__ import annotations

import collections
import functools
import http.server
import threading
from pathlib import Path


class FlakyServer:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests: collections.Counter[str] = collections.Counter()
        self.unavailable: dict[str, int] = {}  # name -> 503 for this many first requests
        self.cut: dict[str, int] = {}  # name -> cut this many first responses halfway
        self.answered_tars: int | None = None  # tar requests after this many hang
        self.silent: set[str] = set()  # names whose requests are never answered
        self.stopping = threading.Event()
        handler = functools.partial(_Handler, self, directory=str(root))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> FlakyServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()


class _Handler(http.server.SimpleHTTPRequestHandler):
    def __init__(self, server_state: FlakyServer, *args, **kwargs) -> None:
        self.state = server_state
        super().__init__(*args, **kwargs)

    def log_message(self, format: str, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        name = self.path.lstrip("/")
        self.state.requests[name] += 1
        seen = self.state.requests[name]
        tars = sum(count for key, count in self.state.requests.items() if key.endswith(".tar"))
        hangs = (
            name.endswith(".tar") and self.state.answered_tars is not None and tars > self.state.answered_tars
        )
        if hangs or name in self.state.silent:
            self.state.stopping.wait()  # a server that never answers
            return
        if seen <= self.state.unavailable.get(name, 0):
            self.send_error(503, "Service Unavailable")
            return
        path = self.state.root / name
        if seen <= self.state.cut.get(name, 0) and path.is_file():
            body = path.read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()
