"""The hello example's service: the release's page on /, /health for readiness, /version.

Listens on 127.0.0.1, port $HELLO_PORT (default 8080): each node of a cluster on one
machine gets its own port through its config (``[components] env = ["HELLO_PORT=..."]``).
cairn runs it in the release directory with CAIRN_NODE and CAIRN_DEPLOYMENT_ID set, and
stops it with SIGTERM. The same file ships in every version of the example.
"""

import argparse
import http.server
import json
import os
import signal
import sys
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", help="a settings file the release must ship")
    args = parser.parse_args()
    if args.config:
        try:
            Path(args.config).read_text()
        except OSError as e:
            sys.exit(f"hello: cannot read {args.config}: {e.strerror}")
    info = {
        "version": Path("app/VERSION").read_text().strip(),
        "node": os.environ.get("CAIRN_NODE", "?"),
        "deployment_id": os.environ.get("CAIRN_DEPLOYMENT_ID", "?"),
    }
    page = Path("build/index.html").read_text()
    for key, value in info.items():
        page = page.replace("{{" + key + "}}", value)
    port = int(os.environ.get("HELLO_PORT", "8080"))

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/health":
                self.reply(200, "text/plain", b"ok\n")
            elif self.path == "/version":
                self.reply(200, "application/json", json.dumps(info).encode() + b"\n")
            elif self.path in ("/", "/index.html"):
                self.reply(200, "text/html; charset=utf-8", page.encode())
            else:
                self.reply(404, "text/plain", b"not found\n")

        def reply(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            if self.path != "/health":  # readiness probes would drown the rest
                print(f"{self.command} {self.path} {args[1] if len(args) > 1 else ''}")

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"hello v{info['version']} on node {info['node']}: http://127.0.0.1:{port}/")
    try:
        server.serve_forever()
    finally:
        server.server_close()
        print("hello: stopped")


if __name__ == "__main__":
    main()
