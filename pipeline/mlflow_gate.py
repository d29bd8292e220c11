"""A token gate in front of the cluster's MLflow server: the only way to it from other machines.

    python -m pipeline.mlflow_gate --listen HEAD_IP:5000 --upstream http://127.0.0.1:5000 \\
        --token-file ~/.ray/auth_token

The MLflow server on the head listens on 127.0.0.1 only. Training ranks on other nodes reach it through
this gate on the head's private address, which forwards a request only when it carries
``Authorization: Bearer <the Ray cluster token>`` (MLflow's client sends it when $MLFLOW_TRACKING_TOKEN is
set; ray_cluster*.yaml sets it from ~/.ray/auth_token, which `ray up` copies to every node and which Ray's
token authentication already requires). Anything else gets 401, except ``GET /health`` (liveness, no
data). The comparison is constant-time. Request and response bodies are streamed, so artifact uploads and
downloads of any size pass; the Authorization header is not forwarded.
"""
from __future__ import annotations

import argparse
import hmac
import http.client
import http.server
import sys
import urllib.parse
from pathlib import Path

CHUNK = 1 << 16
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
              "transfer-encoding", "upgrade", "authorization", "host", "content-length"}


def make_handler(upstream: str, token: bytes) -> type[http.server.BaseHTTPRequestHandler]:
    target = urllib.parse.urlsplit(upstream)

    class Gate(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # one request per connection: bodies end at the close

        def _authorised(self) -> bool:
            if self.command == "GET" and self.path.split("?", 1)[0] == "/health":
                return True
            given = self.headers.get("Authorization", "")
            return given.startswith("Bearer ") and hmac.compare_digest(given[7:].strip().encode(), token)

        def _forward(self) -> None:
            if not self._authorised():
                body = b"cscctrl MLflow gate: a Bearer token (the Ray cluster token) is required\n"
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Bearer realm="cscctrl"')
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            conn = http.client.HTTPConnection(target.hostname, target.port or 80, timeout=300)
            try:
                conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                conn.putheader("Host", target.netloc)
                for name, value in self.headers.items():
                    if name.lower() not in HOP_BY_HOP:
                        conn.putheader(name, value)
                length = int(self.headers.get("Content-Length", 0) or 0)
                chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
                if chunked:
                    conn.putheader("Transfer-Encoding", "chunked")
                else:
                    conn.putheader("Content-Length", str(length))
                conn.endheaders()
                if chunked:
                    self._relay_chunked(conn)
                else:
                    left = length
                    while left > 0:
                        data = self.rfile.read(min(CHUNK, left))
                        if not data:
                            break
                        conn.send(data)
                        left -= len(data)
                response = conn.getresponse()
                self.send_response(response.status, response.reason)
                for name, value in response.getheaders():
                    if name.lower() not in HOP_BY_HOP:
                        self.send_header(name, value)
                self.end_headers()
                while data := response.read(CHUNK):
                    self.wfile.write(data)
            except OSError as e:
                self.send_error(502, f"MLflow behind the gate is unreachable: {e}")
            finally:
                conn.close()

        def _relay_chunked(self, conn: http.client.HTTPConnection) -> None:
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                data = self.rfile.read(size) if size else b""
                self.rfile.readline()  # the CRLF after each chunk
                conn.send(f"{size:x}\r\n".encode() + data + b"\r\n")
                if size == 0:
                    return

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _forward

        def log_message(self, format: str, *args: object) -> None:
            sys.stderr.write(f"{self.address_string()} {format % args}\n")

    return Gate


def serve(listen: str, upstream: str, token: bytes) -> http.server.ThreadingHTTPServer:
    host, _, port = listen.rpartition(":")
    return http.server.ThreadingHTTPServer((host, int(port)), make_handler(upstream, token))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.mlflow_gate", description=__doc__.splitlines()[0])
    p.add_argument("--listen", required=True, help="HOST:PORT to listen on (the head's private address)")
    p.add_argument("--upstream", required=True, help="the MLflow server, e.g. http://127.0.0.1:5000")
    p.add_argument("--token-file", required=True, help="file holding the token (the Ray cluster token)")
    args = p.parse_args(argv)
    token = Path(args.token_file).expanduser().read_bytes().strip()
    if len(token) < 16:
        print(f"{args.token_file}: the token is missing or too short", file=sys.stderr)
        return 2
    server = serve(args.listen, args.upstream, token)
    print(f"cscctrl MLflow gate on {args.listen} -> {args.upstream}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
