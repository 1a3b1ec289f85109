"""A scripted OpenAI-compatible server on 127.0.0.1 for the openai backend's tests.

Each request takes the next step of `script` (an HTTP status such as "429", one with its Retry-After
such as "429@1.5", "drop",
"sleep:SECONDS", "garbage", "nochoices"), then "ok" once the script is spent. "ok" answers a completion with `answer(question)`,
where the question is the prompt's last `Question:` line. Every request is recorded."""

from __future__ import annotations

import json
import socket
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterator


def default_answer(question: str) -> str:
    return f"answer to {question}"


class FakeServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, script=(), answer: Callable[[str], str] = default_answer, model_id="fake-model-id"):
        super().__init__(("127.0.0.1", 0), Handler)
        self.script, self.answer, self.model_id = list(script), answer, model_id
        self.requests: list[dict] = []  # {"path", "headers", "body", "step"}
        self.lock = threading.Lock()
        self.in_flight = self.peak_in_flight = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def questions(self) -> list[str]:
        """The questions of the completion requests answered "ok", in arrival order."""
        return [r["question"] for r in self.requests if r["step"] == "ok" and "question" in r]

    def next_step(self, record: dict) -> str:
        with self.lock:
            record["step"] = self.script.pop(0) if self.script else "ok"
            record["time"] = time.monotonic()
            self.requests.append(record)
            return record["step"]


class Handler(BaseHTTPRequestHandler):
    server: FakeServer

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        self.server.next_step({"path": self.path, "headers": dict(self.headers)})
        self._json(200, {"object": "list", "data": [{"id": self.server.model_id, "object": "model"}]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        prompt = body.get("prompt") or (body.get("messages") or [{}])[-1].get("content", "")
        lines = [ln for ln in prompt.splitlines() if ln.startswith("Question:")]
        record = {"path": self.path, "headers": dict(self.headers), "body": body,
                  "question": lines[-1][len("Question:"):].strip() if lines else prompt}
        step = self.server.next_step(record)
        with self.server.lock:
            self.server.in_flight += 1
            self.server.peak_in_flight = max(self.server.peak_in_flight, self.server.in_flight)
        try:
            self._respond(step, record)
        finally:
            with self.server.lock:
                self.server.in_flight -= 1

    def _respond(self, step: str, record: dict) -> None:
        if step.isdigit():
            return self._json(int(step), {"error": {"message": f"scripted {step}"}}, {"Retry-After": "0"})
        if "@" in step:  # "429@1.5": the status with Retry-After: 1.5
            status, after = step.split("@")
            return self._json(int(status), {"error": {"message": f"scripted {status}"}}, {"Retry-After": after})
        if step == "drop":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)  # no status line: the client sees a drop
            return
        if step.startswith("sleep:"):
            time.sleep(float(step.split(":", 1)[1]))
        if step == "garbage":
            return self._raw(200, b"<html>not json</html>")
        if step == "nochoices":
            return self._json(200, {"model": self.server.model_id, "choices": []})
        text = " " + self.server.answer(record["question"]) + "\nQuestion: rambling on"
        if self.path.endswith("/chat/completions"):
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
        else:
            choice = {"index": 0, "text": text, "finish_reason": "stop"}
        self._json(200, {"id": "cmpl-1", "model": self.server.model_id, "choices": [choice]})

    def _json(self, status: int, obj: dict, headers: dict | None = None) -> None:
        self._raw(status, json.dumps(obj).encode(), headers)

    def _raw(self, status: int, data: bytes, headers: dict | None = None) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a timeout test)


@contextmanager
def running(server: ThreadingHTTPServer) -> Iterator[ThreadingHTTPServer]:
    """Serve `server` on a thread; shut it down on exit."""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def serve(script=(), **kwargs):
    """A running fake server (a context manager), shut down on exit."""
    return running(FakeServer(script, **kwargs))
