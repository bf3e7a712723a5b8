"""A real HTTP server on 127.0.0.1 for shard sets, run in a thread of the test process.

GET serves files under `root`; PUT stores them there (for shard.py --output http://...). Faults, each
keyed by file name and counting down the requests it applies to:
- `drop[name] = n`: the headers promise the whole file, half the body is sent, the connection closes;
- `short[name] = n`: no Content-Length at all, half the body, then a clean close (nothing to notice
  but the size);
- `slow[name] = seconds`: the first GET of `name` waits that long before answering;
- `trickle[name] = n`: the body goes out 64 bytes at a time, 0.2 s apart;
- `endless[name] = n`: the file, then zeros for as long as the client reads;
- `redirect[name] = url`: a 302 to `url`.
`require_auth` ("user:password", Basic) and `require_query` ("token=...") refuse requests without
them with a 401. `put_delay_s` holds each PUT, and `on_put(name)` runs as a PUT arrives.
"""
from __future__ import annotations

import base64
import http.server
import threading
import time
from pathlib import Path
from typing import Callable, Optional
from urllib.parse import urlsplit


class ShardServer:
    def __init__(self, root: Path):
        self.root, self.puts, self.gets, self.requests = Path(root), [], [], []
        self.drop, self.short, self.slow, self.trickle, self.endless, self.redirect = {}, {}, {}, {}, {}, {}
        self.require_auth: Optional[str] = None
        self.require_query: Optional[str] = None
        self.put_delay_s = 0.0
        self.on_put: Optional[Callable[[str], None]] = None
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _allowed(self) -> bool:
                parts = urlsplit(self.path)
                outer.requests.append((self.command, parts.path, parts.query, self.headers.get("Authorization")))
                expected = outer.require_auth and "Basic " + base64.b64encode(outer.require_auth.encode()).decode()
                if (outer.require_auth and self.headers.get("Authorization") != expected) or \
                        (outer.require_query and outer.require_query not in parts.query.split("&")):
                    self.send_error(401)
                    return False
                return True

            def do_GET(self):
                if not self._allowed():
                    return
                rel = urlsplit(self.path).path
                path = outer.root / rel.lstrip("/")
                outer.gets.append(rel)
                name = path.name
                if name in outer.redirect:
                    self.send_response(302)
                    self.send_header("Location", outer.redirect[name])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if not path.is_file():
                    self.send_error(404)
                    return
                if outer.slow.get(name):
                    time.sleep(outer.slow.pop(name))
                data = path.read_bytes()
                self.send_response(200)
                if self._take(outer.short, name):
                    self.end_headers()
                    self.wfile.write(data[: len(data) // 2])
                    self.close_connection = True
                    return
                endless = self._take(outer.endless, name)
                if not endless:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self._take(outer.drop, name):
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                elif self._take(outer.trickle, name):
                    for i in range(0, len(data), 64):
                        self.wfile.write(data[i:i + 64])
                        self.wfile.flush()
                        time.sleep(0.2)
                elif endless:
                    self.wfile.write(data)
                    try:
                        while True:
                            self.wfile.write(b"\0" * 65536)
                    except OSError:
                        self.close_connection = True
                else:
                    self.wfile.write(data)

            @staticmethod
            def _take(faults: dict, name: str) -> bool:
                if faults.get(name, 0) > 0:
                    faults[name] -= 1
                    return True
                return False

            def do_PUT(self):
                if not self._allowed():
                    return
                data = self.rfile.read(int(self.headers["Content-Length"]))
                path = outer.root / urlsplit(self.path).path.lstrip("/")
                if outer.on_put is not None:
                    outer.on_put(path.name)
                time.sleep(outer.put_delay_s)
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
