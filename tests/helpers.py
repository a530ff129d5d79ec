"""Helpers several test modules share (test modules never import each other).

`JudgeServer` is a scripted OpenAI-style chat-completions endpoint on 127.0.0.1: it answers
POST /v1/chat/completions from a thread on an ephemeral port (GET too, where a redirect turned the
POST into one). Each request takes the next planned action (a reply text, an HTTP status, a
non-JSON body, a delay, a trickled reply, or a redirect), else the default reply; it serves at
most `max_requests` and shuts down when its `with` block ends.
"""

import collections
import http.server
import json
import threading
import time


class _QuietServer(http.server.ThreadingHTTPServer):
  daemon_threads = True

  def handle_error(self, request, client_address):
    pass  # a client that timed out closes its socket; writing the late reply then fails


class JudgeServer:
  """A scripted chat-completions endpoint; `requests` holds (headers, JSON body or None) of each
  call and `paths` its (method, path)."""

  def __init__(self, default_reply="[4 points]", max_requests=200):
    self.default_reply = default_reply
    self.max_requests = max_requests
    self.plan = collections.deque()
    self.requests = []
    self.paths = []
    self._lock = threading.Lock()
    owner = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def log_message(self, *args):  # keep test output quiet
        pass

      def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with owner._lock:
          owner.requests.append((dict(self.headers), json.loads(body) if body else None))
          owner.paths.append((self.command, self.path))
          count = len(owner.requests)
          action = owner.plan.popleft() if owner.plan else ("reply", None)
        if not self.path.endswith("/chat/completions"):
          return self._send(404, b'{"error": "no such route"}')
        if count > owner.max_requests:
          return self._send(400, b'{"error": "request budget of the test server spent"}')
        kind, value = action
        if kind == "redirect":  # value: (status, Location)
          return self._send(value[0], b"", location=value[1])
        if kind == "status":  # value: a status, (status, body) or (status, body, headers)
          value = value if isinstance(value, tuple) else (value, b'{"error": "failed"}')
          status, data, headers = (value + ({},))[:3]
          return self._send(status, data, headers=headers)
        if kind == "garbage":
          return self._send(200, b"<html>not json</html>")
        if kind == "unsized":  # value: a reply text, sent without Content-Length (read to EOF)
          return self._send(200, self._completion(count, value), sized=False)
        if kind == "trickle":  # value: seconds between bytes of the default reply, sent one by one
          return self._trickle(self._completion(count, owner.default_reply), value)
        if kind == "sleep":
          time.sleep(value)
          value = None
        reply = value if value is not None else owner.default_reply
        if callable(reply):
          reply = reply(json.loads(body) if body else None)
        return self._send(200, self._completion(count, reply))

      do_GET = do_POST

      @staticmethod
      def _completion(count, reply):
        return json.dumps({"id": f"test-{count}", "object": "chat.completion",
                           "choices": [{"index": 0, "finish_reason": "stop",
                                        "message": {"role": "assistant", "content": reply}}]}
                          ).encode()

      def _trickle(self, data, pause):
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        for index in range(len(data)):
          try:
            self.wfile.write(data[index:index + 1])
            self.wfile.flush()
          except OSError:
            return  # the client hung up
          time.sleep(pause)

      def _send(self, status, data, location=None, headers=(), sized=True):
        self.send_response(status)
        for name, value in dict(headers).items():
          self.send_header(name, value)
        if location:
          self.send_header("Location", location)
        self.send_header("Content-Type", "application/json")
        if sized:
          self.send_header("Content-Length", str(len(data)))
        else:
          self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    self._server = _QuietServer(("127.0.0.1", 0), Handler)
    self.origin = f"http://127.0.0.1:{self._server.server_address[1]}"
    self.url = self.origin + "/v1"
    self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True)

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._server.shutdown()
    self._server.server_close()
    self._thread.join(timeout=5)

  def then(self, *actions):
    """Plans the next requests' actions, e.g. then(("status", 500), ("reply", "[2 points]"))."""
    self.plan.extend(actions)
    return self
