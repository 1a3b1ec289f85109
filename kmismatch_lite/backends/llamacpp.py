"""llama.cpp GGUF generation (llama-cpp-python), greedy or by seeded temperature sampling. Greedy
answers are decoded `parallel` at once (llamacpp_batch; 8 on the CPU by default) after their
shared prefix is evaluated once; with `parallel=1`, one prompt at a time, keeping the KV cache of
the prefix shared with the previous prompt, as a plain llama.cpp loop does.

Tokens are picked from llama.cpp's logits by kmismatch_lite.qa.sampling (argmax, or plain temperature
sampling with no top-k/top-p/min-p and a random stream per prompt), not by llama.cpp's sampler
chain, so the prefix KV cache stays ours and every backend samples alike. Sampled answers are
always decoded one at a time: batched decoding changes the last bits of the logits (see
llamacpp_batch), and a sampled answer must not depend on the batch."""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from kmismatch_lite.backends import answer_each, common_length, cpu_threads
from kmismatch_lite.qa.prompts import clean_output
from kmismatch_lite.cards import Model, check_gguf
from kmismatch_lite.errors import KmmError, missing_extra
from kmismatch_lite.qa.sampling import GREEDY, Sampling

OPTIONS = {"n_ctx": int, "threads": int, "n_gpu_layers": int, "lora_scale": float, "parallel": int,
           "exact": bool, "fresh": bool, "special": bool}

# Greedy answers decoded at once on the CPU (llamacpp_batch's fast mode). Measured on a 2-core
# CPU (bench/check_speed.py, 200 questions, 3-shot): 1.84x (SmolLM2) and 1.93x (Gemma 3) the
# questions/s of a plain create_completion loop, with 190-192 of 200 greedy answers equal (the
# others near-ties flipped by other arithmetic orders). parallel=1 answers one at a time, as the
# plain loop does; exact=True batches without changing SmolLM2's answers, at 1.38x. With GPU
# offload answers are decoded one at a time unless `parallel` is given: batching was measured on
# the CPU only.
PARALLEL = 8

# OpenMP's wait policy is left to the user: GNU OpenMP's default (spin briefly, then sleep) ran
# 2.8x faster than OMP_WAIT_POLICY=passive on an idle 2-core machine (18.5 vs 6.6 q/s), while on a
# machine crowded with other jobs, passive avoids threads spinning against each other.


def _quiet_llama(**kwargs):
    """Build a Llama while keeping llama.cpp's C-level log lines off the terminal."""
    from llama_cpp import Llama
    from llama_cpp._utils import suppress_stdout_stderr

    # verbose=False misses some lines (Gemma's "llama_kv_cache_iswa: using full-size SWA cache").
    with suppress_stdout_stderr(disable=False):
        return Llama(verbose=False, **kwargs)


class LlamaCppGenerator:
    """Greedy or sampled answers from a GGUF model, optionally with a GGUF LoRA adapter."""

    name = "llamacpp"

    def __init__(self, model: Model, *, adapter: Path | None = None, seed: int = 0,
                 n_ctx: int = 1024, threads: int | None = None, n_gpu_layers: int | None = None,
                 lora_scale: float = 1.0, parallel: int | None = None, exact: bool = False,
                 fresh: bool = False, special: bool = False):
        if parallel is not None and parallel < 1:
            raise KmmError(f"parallel must be at least 1 (got {parallel})")
        if fresh and parallel not in (None, 1):
            raise KmmError("fresh=true answers one prompt at a time: it takes parallel=1")
        # fresh: every prompt from an empty cache, alone, so an answer never depends on the other
        # questions, their order or which cells a previous prompt left (K-quant matmuls round with
        # the rows in a call).
        self.fresh = fresh
        # special: the prompt's special-token texts (a chat template's turn markers) are tokens.
        self.special = special
        if fresh:
            parallel = 1
        if adapter is not None:
            from kmismatch_lite.formats.export_gguf import check_adapter

            check_gguf(Path(adapter), "adapter")
            check_adapter(Path(adapter), model)  # llama.cpp accepts an adapter made for another base file
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            raise missing_extra("llama-cpp-python", "llamacpp") from None
        if n_gpu_layers is None:
            n_gpu_layers = -1 if _gpu_offload() else 0
        if parallel is None:
            parallel = PARALLEL if n_gpu_layers == 0 else 1
        self.model, self.adapter, self.seed, self.parallel, self.exact = model, adapter, seed, parallel, exact
        threads = threads or cpu_threads()
        try:
            self.llm = _quiet_llama(
                model_path=str(model.gguf_path), n_ctx=n_ctx, seed=seed,
                n_threads=threads, n_batch=512, n_gpu_layers=n_gpu_layers,
            )
        except (ValueError, RuntimeError, OSError) as exc:
            raise KmmError(f"llama.cpp could not load {model.gguf_path} (corrupt or truncated file?): {exc}") from None
        lora = _load_lora(self.llm, Path(adapter)) if adapter is not None else None
        if lora is not None:
            _set_lora(self.llm._ctx.ctx, lora, lora_scale, Path(adapter))
        self._batched = None
        if parallel > 1:
            from kmismatch_lite.backends.llamacpp_batch import BatchDecoder

            on_context = None if lora is None else (lambda ctx: _set_lora(ctx, lora, lora_scale, Path(adapter)))
            self._batched = BatchDecoder(self.llm, parallel, threads, on_context, exact=exact)
            self.llm._stack.callback(self._batched.close)
        self._eos = {self.llm.token_eos()}
        eot = getattr(self.llm, "_model", None)
        if eot is not None and hasattr(eot, "token_eot"):
            self._eos.add(eot.token_eot())
        self._cached: list[int] = []

    def info(self) -> dict[str, Any]:
        import llama_cpp

        return {"backend": self.name, "llama_cpp_python": llama_cpp.__version__,
                "model": str(self.model.gguf_path), "adapter": str(self.adapter) if self.adapter else None,
                "parallel": self.parallel, "exact": self.exact, "fresh": self.fresh, "special": self.special}

    def close(self) -> None:
        self.llm.close() if hasattr(self.llm, "close") else None

    def _eval_prompt(self, tokens: list[int]) -> None:
        # Keep the cached tokens shared with this prompt; evaluate only the rest.
        keep = 0 if self.fresh else common_length(self._cached, tokens[:-1])
        self.llm.n_tokens = keep
        self.llm.eval(tokens[keep:])
        self._cached = list(tokens)

    def _tokens(self, prompt: str, max_tokens: int) -> list[int]:
        """The prompt's tokens; an error if they and the answer do not fit the context."""
        tokens = self.llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=self.special)
        if len(tokens) + max_tokens > self.llm.n_ctx():
            raise KmmError(f"prompt of {len(tokens)} tokens does not fit the context of {self.llm.n_ctx()}")
        return tokens

    def _complete(self, prompt: str, max_tokens: int, stop: Sequence[str], sampling: Sampling) -> str:
        llm = self.llm
        tokens = self._tokens(prompt, max_tokens)
        self._eval_prompt(tokens)
        pick = sampling.picker(prompt)
        out = b""
        for _ in range(max_tokens):
            tok = pick(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)))
            if tok in self._eos:
                break
            out += llm.detokenize([tok], prev_tokens=self._cached)
            self._cached.append(tok)
            text = out.decode("utf-8", errors="ignore")
            if any(s in text for s in stop):
                break
            llm.eval([tok])
        # The KV cache holds the first n_tokens of these (the last sampled token may not be evaluated).
        self._cached = self._cached[: llm.n_tokens]
        return clean_output(out.decode("utf-8", errors="ignore"), stop)

    def generate(self, prompts: Sequence[str], *, max_tokens: int, stop: Sequence[str],
                 progress=None, sampling: Sampling = GREEDY) -> list[str]:
        if self._batched is None or not sampling.greedy:
            return answer_each(self._complete, prompts, max_tokens, stop, progress, sampling)
        token_lists = [self._tokens(p, max_tokens) for p in prompts]
        return self._batched.generate(token_lists, max_tokens, stop, self._eos, progress)


def chat_formatter(model: Model):
    """The model's own chat template (its GGUF's `tokenizer.chat_template`) as llama-cpp-python
    renders it: messages in, the prompt text out. Where the tokenizer adds the BOS token itself,
    a BOS text the template writes first is left to it, so the prompt never starts with two."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    check_gguf(Path(model.gguf_path), "model")
    llm = _quiet_llama(model_path=str(model.gguf_path), vocab_only=True)
    try:
        template = llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise KmmError(f"{model.name}: its GGUF has no chat template (tokenizer.chat_template); "
                           f"use the base prompt")
        bos, eos = (llm._model.token_get_text(t) for t in (llm.token_bos(), llm.token_eos()))
        adds_bos = bool(llm.tokenize(b"", add_bos=True, special=True))
    finally:
        llm.close()
    render = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos, add_generation_prompt=True)

    def format_messages(messages: list[dict]) -> str:
        prompt = render(messages=messages).prompt
        return prompt[len(bos):] if adds_bos and bos and prompt.startswith(bos) else prompt

    return format_messages


def _load_lora(llm, adapter: Path):
    """Load a GGUF LoRA onto the model. Not through Llama(lora_path=...): llama-cpp-python misses
    the NULL that llama.cpp returns for a bad adapter (another base, not a LoRA, truncated) and
    then segfaults."""
    import llama_cpp
    from llama_cpp._utils import suppress_stdout_stderr

    # llama.cpp logs a line per tensor it cannot place in a repacked buffer (Gemma: dozens).
    with suppress_stdout_stderr(disable=False):
        lora = llama_cpp.llama_adapter_lora_init(llm._model.model, str(adapter).encode("utf-8"))
    if not lora:
        raise KmmError(f"llama.cpp could not load the adapter {adapter}: not a LoRA adapter GGUF, "
                       f"truncated, or made for another base model than {llm.model_path}")
    llm._stack.callback(llama_cpp.llama_adapter_lora_free, lora)
    return lora


def _set_lora(ctx, lora, scale: float, adapter: Path) -> None:
    """Apply a loaded LoRA in a context."""
    import llama_cpp

    adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(lora)
    if llama_cpp.llama_set_adapters_lora(ctx, adapters, 1, (ctypes.c_float * 1)(scale)):
        raise KmmError(f"llama.cpp could not apply the adapter {adapter}")


def _gpu_offload() -> bool:
    try:
        import llama_cpp

        return bool(llama_cpp.llama_supports_gpu_offload())
    except (ImportError, AttributeError):
        return False
