"""An EC2 instance metadata service on loopback that speaks IMDSv2, for the rehearsal (which gives a fake
spot node its interruption notice and lets the real spot watcher drain it) and the tests: a session
token (PUT /latest/api/token) on every read, the instance life cycle, and the spot instance-action
document once `notice` is set (404 before, as on EC2)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def notice_in(seconds: float, action: str = "terminate") -> dict:
    """An instance-action document for a reclaim `seconds` from now."""
    return {"action": action, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + seconds))}


class FakeImds:
    """life_cycle: spot | on-demand; notice: the instance-action document once set (a dict, a raw string,
    or a list of them served one per read); tokens issued and paths read are kept for tests."""

    def __init__(self, life_cycle: str = "spot", notice=None):
        self.life_cycle, self.notice, self.tokens, self.reads = life_cycle, notice, 0, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code, body=""):
                self.send_response(code)
                self.end_headers()
                self.wfile.write(body.encode())

            def do_PUT(self):
                if self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                    outer.tokens += 1
                    return self._send(200, f"token-{outer.tokens}")
                self._send(400)

            def do_GET(self):
                if self.headers.get("X-aws-ec2-metadata-token") != f"token-{outer.tokens}":
                    return self._send(401)  # IMDSv2 only: no token, or an old one
                outer.reads.append(self.path)
                if self.path == "/latest/meta-data/instance-life-cycle":
                    return self._send(200, outer.life_cycle)
                if self.path == "/latest/meta-data/spot/instance-action" and outer.notice:
                    body = outer.notice.pop(0) if isinstance(outer.notice, list) else outer.notice
                    return self._send(200, body if isinstance(body, str) else json.dumps(body))
                self._send(404)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
