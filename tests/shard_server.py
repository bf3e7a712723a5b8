"""A real HTTP server on 127.0.0.1 for shard sets, run in a thread of the test process.

GET serves files under `root`; PUT stores them there (for shard.py --output http://...). Faults:
`drop[name] = n` cuts the next n downloads of `name` half-way: the headers promise the whole file,
half the body is sent, and the connection is closed, as a dropped connection would.
"""
from __future__ import annotations

import http.server
import threading
from pathlib import Path


class ShardServer:
    def __init__(self, root: Path):
        self.root, self.drop, self.puts, self.gets = Path(root), {}, [], []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                path = outer.root / self.path.lstrip("/")
                outer.gets.append(self.path)
                if not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if outer.drop.get(path.name, 0) > 0:
                    outer.drop[path.name] -= 1
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(data)

            def do_PUT(self):
                data = self.rfile.read(int(self.headers["Content-Length"]))
                path = outer.root / self.path.lstrip("/")
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
                outer.puts.append(path.name)
                self.send_response(201)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    def __enter__(self) -> "ShardServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
