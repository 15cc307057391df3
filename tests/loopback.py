"""A folder served over http on 127.0.0.1 for the length of a test (stopped and joined after),
for the tests that read shards by URL."""
from __future__ import annotations

import contextlib
import functools
import http.server
import threading


@contextlib.contextmanager
def serve_directory(root, requests: list | None = None):
    """Yields the base URL of `root`; each requested path is appended to `requests`, if given."""
    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, fmt, *args):
            if requests is not None:
                requests.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
