"""A fake Hugging Face hub on loopback for the download tests (never the internet)."""

from __future__ import annotations


class FakeHub:
    """The Hugging Face hub's file-resolve API (``/<repo>/resolve/<revision>/<file>``, HTTP Range honoured) on a
    loopback port: the real download code runs against it, never the internet. ``cut_after`` makes the next
    response stop after that many bytes (an interrupted download); ``requests`` records (path, Range header)."""

    def __init__(self, files: dict[str, bytes]) -> None:
        import http.server
        import threading

        self.files = files
        self.requests: list[tuple[str, str | None]] = []
        self.cut_after: int | None = None
        #: Content-Type per path (default application/octet-stream, as the hub's file CDN answers)
        self.content_types: dict[str, str] = {}
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                rng = self.headers.get("Range")
                hub.requests.append((self.path, rng))
                data = hub.files.get(self.path)
                if data is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = data[start:]
                self.send_response(206 if rng else 200)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Content-Type", hub.content_types.get(self.path, "application/octet-stream"))
                self.end_headers()
                if hub.cut_after is not None:
                    body, hub.cut_after = body[: hub.cut_after], None
                    self.wfile.write(body)
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
