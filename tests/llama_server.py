"""llama-cpp-python's own OpenAI-compatible server as a subprocess on loopback: started, waited
for with a bounded loop, and stopped. Used by the integration test and bench/openai_concurrency.py."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_llama_server(gguf: Path, alias: str, port: int, threads: int = 2,
                       log: Path | None = None) -> subprocess.Popen:
    """llama-cpp-python's server on loopback, ready to answer (or an error after 120 s)."""
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", alias,
           "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "1024", "--n_threads", str(threads),
           "--n_threads_batch", str(threads), "--seed", "0"]
    out = open(log, "wb") if log else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    if log:
        out.close()  # the server holds its own descriptor
    no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = Path(log).read_text(errors="replace")[-2000:] if log else ""
            raise RuntimeError(f"llama_cpp.server exited with status {proc.returncode}\n{tail}")
        try:
            with no_proxy.open(f"http://127.0.0.1:{port}/v1/models", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    stop_llama_server(proc)
    raise RuntimeError("llama_cpp.server did not get ready within 120 s")


def stop_llama_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=15)
