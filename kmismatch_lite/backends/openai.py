"""Generation against an OpenAI-compatible server (llama-server, llama-cpp-python's server, vLLM,
Ollama, LM Studio): stdlib HTTP in a thread pool, retries with exponential backoff, and a JSONL
answer cache written as answers arrive, so an interrupted generation resumes where it stopped.

Sampled answers send the temperature and each prompt's own seed (kmismatch_lite.qa.sampling), with
top_p 1 and, as extras, top_k 0 and min_p 0: plain temperature sampling. A server may ignore the
seed (the OpenAI API calls it best effort; some servers drop it), and then sampled answers are not
reproducible; the cache still keeps those it got, keyed by the sampling settings."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import random
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Sequence

from kmismatch_lite.cards import Model
from kmismatch_lite.errors import KmmError
from kmismatch_lite.qa.prompts import clean_output
from kmismatch_lite.qa.sampling import GREEDY, TRUNCATION, Sampling

OPTIONS = {"endpoint": str, "api_key_env": str, "concurrency": int, "timeout": float,
           "retries": int, "backoff": float, "cache": str, "greedy_extras": bool}
ENDPOINTS = {"completions": "/completions", "chat": "/chat/completions"}
# Fields outside the OpenAI schema that llama.cpp, vLLM and LM Studio read: without them
# llama-cpp-python's server applies a repeat penalty of 1.1 even at temperature 0, and llama.cpp's
# servers truncate sampling to top_k 40 and min_p 0.05 (top_k 0: the whole vocabulary).
GREEDY_EXTRAS = {"repeat_penalty": 1.0, "top_k": 1}
SAMPLING_EXTRAS = {"repeat_penalty": 1.0, "top_k": 0, "min_p": 0.0}
MAX_DELAY = 30.0


class Transient(Exception):
    """A failure worth retrying (429, 5xx, a dropped connection, a timeout); `str()` says which."""

    def __init__(self, status: str, retry_after: float | None = None):
        super().__init__(status)
        self.retry_after = retry_after


class OpenAIGenerator:
    """Greedy or sampled answers from a served model, many requests in flight, each answer cached
    on arrival. `greedy_extras` sends the non-OpenAI fields that keep decoding plain (GREEDY_EXTRAS,
    or SAMPLING_EXTRAS when sampling)."""

    name = "openai"

    def __init__(self, model: Model, adapter: Path | None = None, seed: int = 0, *,
                 endpoint: str = "completions", api_key_env: str = "OPENAI_API_KEY",
                 concurrency: int = 4, timeout: float = 120.0, retries: int = 5,
                 backoff: float = 0.5, cache: str | Path | None = None, greedy_extras: bool = True):
        if adapter is not None:
            raise KmmError("the openai backend cannot apply a LoRA adapter: serve the fine-tuned "
                           "model and name it, or use a local backend")
        if not model.served:
            raise KmmError(f"the openai backend needs a served model (openai:http://host:port/v1#model), not '{model.name}'")
        if endpoint not in ENDPOINTS:
            raise KmmError(f"bad endpoint '{endpoint}' for the openai backend (choose from {', '.join(ENDPOINTS)})")
        if concurrency < 1 or retries < 0 or timeout <= 0 or backoff < 0:
            raise KmmError("the openai backend needs concurrency >= 1, retries >= 0, timeout > 0, backoff >= 0")
        self.model, self.seed, self.endpoint = model, seed, endpoint
        self.concurrency, self.timeout, self.retries, self.backoff = concurrency, timeout, retries, backoff
        self.greedy_extras, self.api_key_env = greedy_extras, api_key_env
        self.server = _display_url(model.url)
        self._key = os.environ.get(api_key_env) or None  # kept private: never logged or recorded
        self._opener = _opener(model.url)
        self.cache = AnswerCache(Path(cache)) if cache else None
        self.server_model_id: str | None = None
        self.requests = 0  # HTTP requests sent, retries included
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def info(self) -> dict[str, Any]:
        if self.server_model_id is None:
            self.server_model_id = self._listed_model_id()
        return {"backend": self.name, "base_url": self.server, "model": self.model.name,
                "server_model_id": self.server_model_id, "endpoint": self.endpoint,
                "concurrency": self.concurrency, "timeout": self.timeout, "retries": self.retries,
                "greedy_extras": self.greedy_extras, "api_key_env": self.api_key_env,
                "cache": str(self.cache.path) if self.cache else None, "requests": self.requests}

    def close(self) -> None:
        self._stop.set()

    def generate(self, prompts: Sequence[str], *, max_tokens: int, stop: Sequence[str],
                 progress=None, sampling: Sampling = GREEDY) -> list[str]:
        keys = [cache_key(self.model.name, self.endpoint, p, max_tokens, stop, sampling) for p in prompts]
        answers = self.cache.load() if self.cache else {}
        todo = {k: p for k, p in zip(keys, prompts) if k not in answers}
        copies = Counter(keys)  # a prompt asked twice is sent once and counted twice
        if progress and len(prompts) > len(todo):
            progress(sum(n for k, n in copies.items() if k in answers))
        self._stop.clear()
        pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="kmm-openai")
        try:
            futures = {pool.submit(self._answer, k, p, max_tokens, stop, sampling): k for k, p in todo.items()}
            for fut in as_completed(futures):
                answers[futures[fut]] = fut.result()
                if progress:
                    progress(copies[futures[fut]])
        finally:
            # Stop retrying, drop what has not started; what is in flight still lands in the cache.
            self._stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
        return [answers[k] for k in keys]

    def _answer(self, key: str, prompt: str, max_tokens: int, stop: Sequence[str], sampling: Sampling) -> str:
        body = self._body(prompt, max_tokens, stop, sampling)
        reply = self._post(ENDPOINTS[self.endpoint], body)
        text = clean_output(self._text(reply, prompt), stop)
        if isinstance(reply.get("model"), str) and self.server_model_id is None:
            self.server_model_id = reply["model"]
        if self.cache:
            self.cache.add(key, question_line(prompt), text)
        return text

    def _body(self, prompt: str, max_tokens: int, stop: Sequence[str], sampling: Sampling) -> dict:
        seed = self.seed if sampling.greedy else sampling.prompt_seed(prompt)
        body: dict[str, Any] = {"model": self.model.name, "max_tokens": max_tokens, "stop": list(stop),
                                "temperature": sampling.temperature, "top_p": 1.0, "seed": seed, "n": 1,
                                "stream": False}
        if self.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        if not self.greedy_extras:
            return body
        return {**body, **(GREEDY_EXTRAS if sampling.greedy else SAMPLING_EXTRAS)}

    def _text(self, reply: Any, prompt: str) -> str:
        try:
            choice = reply["choices"][0]
            text = choice["message"]["content"] if self.endpoint == "chat" else choice["text"]
        except (KeyError, IndexError, TypeError):
            text = None
        if not isinstance(text, str):
            field = "choices[0].message.content" if self.endpoint == "chat" else "choices[0].text"
            raise KmmError(f"malformed response from {self.server} (no {field} string) "
                           f"for question '{question_line(prompt)}'")
        return text

    def _post(self, path: str, body: dict) -> Any:
        """One JSON request with retries; a KmmError once they are spent or for a 4xx."""
        data = json.dumps(body).encode("utf-8")
        last = ""
        for attempt in range(self.retries + 1):
            if attempt and self._stop.is_set():
                break
            try:
                raw = self._send(path, data)
            except Transient as exc:
                last = str(exc)
                if attempt < self.retries and not self._stop.is_set():
                    self._stop.wait(self._delay(attempt, exc.retry_after))
                continue
            try:
                return json.loads(raw)
            except ValueError:
                return None  # reported as malformed by the caller, with the question
        raise KmmError(f"{self.server} did not answer after {attempt + 1} attempts: last status {last}")

    def _send(self, path: str, data: bytes | None) -> bytes:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        req = urllib.request.Request(self.model.url + path, data=data, headers=headers,
                                     method="POST" if data is not None else "GET")
        with self._lock:
            self.requests += 1
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                return resp.read()
        except urllib.error.HTTPError as exc:
            status = f"HTTP {exc.code} {_body_hint(exc, self._key)}".strip()
            if exc.code == 429 or exc.code >= 500:
                raise Transient(status, _retry_after(exc)) from None
            raise KmmError(f"{self.server} refused the request: {status}") from None
        except TimeoutError:
            raise Transient(f"timed out after {self.timeout:g}s") from None
        except urllib.error.URLError as exc:
            raise Transient(f"connection error ({_reason(exc.reason)})") from None
        except (OSError, http.client.HTTPException) as exc:
            raise Transient(f"connection error ({_reason(exc)})") from None

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        delay = retry_after if retry_after is not None else self.backoff * 2 ** attempt
        return min(MAX_DELAY, delay) * (1 + random.random() / 4)  # jitter: spread out a burst of 429s

    def _listed_model_id(self) -> str | None:
        """The server's id for the model, from GET /models; None if it does not say."""
        try:
            listed = json.loads(self._send("/models", None)).get("data", [])
            ids = [m.get("id") for m in listed if isinstance(m, dict)]
        except (Transient, KmmError, ValueError, AttributeError):
            return None
        if self.model.name in ids:
            return self.model.name
        return ids[0] if len(ids) == 1 and isinstance(ids[0], str) else None


class AnswerCache:
    """Answers by request hash, one JSON line each, appended as they arrive. A line cut short by
    a crash is skipped on reading."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()

    def load(self) -> dict[str, str]:
        out: dict[str, str] = {}
        if not self.path.is_file():
            return out
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                    out[row["key"]] = row["output"]
                except (ValueError, KeyError, TypeError):
                    continue
        return out

    def add(self, key: str, question: str, output: str) -> None:
        line = json.dumps({"key": key, "question": question, "output": output}, ensure_ascii=False)
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                # A crash may have left a last line without its newline: start a fresh one.
                if f.tell() and not _ends_with_newline(self.path):
                    f.write("\n")
                f.write(line + "\n")


def cache_key(model: str, endpoint: str, prompt: str, max_tokens: int, stop: Sequence[str],
              sampling: Sampling = GREEDY) -> str:
    """The hash that names one request's answer in the cache; a sampled answer's names its
    temperature and seed, so greedy and sampled answers never stand in for each other."""
    request: list[Any] = [model, endpoint, prompt, max_tokens, list(stop)]
    if not sampling.greedy:
        request.append({"temperature": sampling.temperature, "seed": sampling.seed, "truncation": TRUNCATION})
    blob = json.dumps(request, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def question_line(prompt: str) -> str:
    """The question a prompt asks: its last `Question:` line, else its last non-empty line."""
    lines = [ln.strip() for ln in prompt.splitlines() if ln.strip()]
    asked = [ln for ln in lines if ln.startswith("Question:")]
    return (asked or lines or [""])[-1]


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def _display_url(url: str) -> str:
    """The base URL without any user:password part."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _opener(url: str) -> urllib.request.OpenerDirector:
    # Loopback servers bypass any HTTP(S)_PROXY in the environment; remote ones honour it.
    host = urllib.parse.urlsplit(url).hostname or ""
    if host in ("localhost", "::1") or host.startswith("127."):
        return urllib.request.build_opener(urllib.request.ProxyHandler({}))
    return urllib.request.build_opener()


def _retry_after(exc: urllib.error.HTTPError) -> float | None:
    try:
        return max(0.0, float(exc.headers.get("Retry-After", "")))
    except (TypeError, ValueError):
        return None


def _body_hint(exc: urllib.error.HTTPError, key: str | None) -> str:
    """The first line of an error body, short, with the API key blanked should a server echo it."""
    try:
        text = exc.read(300).decode("utf-8", errors="replace")
    except (OSError, http.client.HTTPException):
        return ""
    line = " ".join(text.split())[:200]
    return line.replace(key, "***") if key else line


def _reason(reason: Any) -> str:
    return type(reason).__name__ if not str(reason) else f"{type(reason).__name__}: {reason}"
