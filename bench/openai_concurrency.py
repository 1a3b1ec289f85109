"""Throughput of the openai backend against llama-cpp-python's server on loopback, one request at
a time versus several in flight: the same questions, several timed repeats, medians and ratios.

llama-cpp-python's server answers one request at a time (a lock around its one model), so with
`--servers 1` concurrency can only overlap HTTP and JSON work with generation. `--servers 2` starts
two server processes (threads split between them) behind a small least-busy proxy in this script,
which is what serving a model with parallel slots (llama-server -np, vLLM) gives a client.

    python bench/openai_concurrency.py --questions 30 --repeats 3 --servers 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import ExitStack, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the server start/stop helpers the integration test uses

from llama_server import free_port, start_llama_server, stop_llama_server  # noqa: E402

from kmismatch_lite import cards  # noqa: E402
from kmismatch_lite.qa import prompts  # noqa: E402
from kmismatch_lite.qa import data
from kmismatch_lite.backends.openai import OpenAIGenerator  # noqa: E402

NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@contextmanager
def llama_servers(gguf: Path, count: int, threads: int):
    """`count` servers on loopback; yields their base URLs; always stops them."""
    procs, urls = [], []
    try:
        for _ in range(count):
            port = free_port()
            procs.append(start_llama_server(gguf, "bench", port, threads=threads))
            urls.append(f"http://127.0.0.1:{port}")
        yield urls
    finally:
        for proc in procs:
            stop_llama_server(proc)


@contextmanager
def least_busy_proxy(upstreams: list[str]):
    """A loopback proxy sending each request to the upstream with the fewest in flight."""
    busy = [0] * len(upstreams)
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _forward(self, data: bytes | None):
            with lock:
                i = busy.index(min(busy))
                busy[i] += 1
            try:
                req = urllib.request.Request(upstreams[i] + self.path, data=data, method=self.command,
                                             headers={"Content-Type": "application/json"})
                try:
                    with NO_PROXY.open(req, timeout=300) as r:
                        status, body = r.status, r.read()
                except urllib.error.HTTPError as exc:
                    status, body = exc.code, exc.read()
            finally:
                with lock:
                    busy[i] -= 1
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            self._forward(None)

        def do_POST(self):
            self._forward(self.rfile.read(int(self.headers.get("Content-Length", 0))))

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def timed_run(url: str, rendered: list[str], concurrency: int) -> tuple[float, list[str]]:
    gen = OpenAIGenerator(cards.resolve(f"openai:{url}/v1#bench"), concurrency=concurrency, timeout=300)
    t0 = time.perf_counter()
    outputs = gen.generate(rendered, max_tokens=prompts.MAX_TOKENS, stop=prompts.STOP)
    seconds = time.perf_counter() - t0
    gen.close()
    return seconds, outputs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--questions", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--concurrency", default="1,2,4")
    ap.add_argument("--servers", type=int, default=1, choices=(1, 2))
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="llama.cpp threads in all")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    qs = data.load("geonames", seed=0)
    template = prompts.few_shot(qs.exemplars, seed=0)
    rendered = [template.render(q.question) for q in qs.split("test")[: args.questions]]
    gguf = cards.resolve(args.model).gguf_path
    per_server = max(1, args.threads // args.servers)
    results = {}
    with ExitStack() as stack:
        urls = stack.enter_context(llama_servers(gguf, args.servers, per_server))
        url = urls[0] if args.servers == 1 else stack.enter_context(least_busy_proxy(urls))
        baseline = timed_run(url, rendered, 1)[1]  # warm-up: loads pages, fills the prefix caches
        for rep in range(args.repeats):
            for c in levels:  # interleaved, so a slow spell on a shared machine hits every level
                seconds, outputs = timed_run(url, rendered, c)
                results.setdefault(c, {"seconds": [], "same_outputs": True})
                results[c]["seconds"].append(round(seconds, 3))
                results[c]["same_outputs"] &= outputs == baseline
                print(f"repeat {rep + 1} concurrency {c}: {seconds:.2f}s", file=sys.stderr)
    base = statistics.median(results[levels[0]]["seconds"])
    print(f"{args.questions} questions, {args.repeats} repeats, {args.servers} server(s) x {per_server} "
          f"thread(s), {os.cpu_count()} CPUs, model {args.model}")
    print(f"{'concurrency':>11} {'median s':>9} {'q/s':>6} {'speed-up':>8}  same answers  runs")
    for c in levels:
        med = statistics.median(results[c]["seconds"])
        results[c].update(median=med, questions_per_second=round(args.questions / med, 2), ratio=round(base / med, 3))
        print(f"{c:>11} {med:>9.2f} {args.questions / med:>6.2f} {base / med:>7.2f}x  "
              f"{str(results[c]['same_outputs']):>12}  {results[c]['seconds']}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
