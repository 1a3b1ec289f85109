"""Batched greedy decoding in llama.cpp: several prompts answered together in one context.

The prompts' shared token prefix (few-shot exemplars, or the start of the zero-shot form) is
decoded once into sequence 0; its KV cells are shared with N slot sequences (a unified KV cache
copies only cell metadata). Each step decodes every active slot in one `llama_decode`: a new
prompt's remaining tokens, or the last token picked for an answer in progress. A slot whose answer
ends (stop string, end of generation, token cap) drops its cells after the prefix and takes the
next prompt in the same step.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from kmismatch_lite.errors import KmmError
from kmismatch_lite.prompts import clean_output

PREFIX_SEQ = 0


@dataclass
class _Answer:
    """One prompt's answer in progress in a slot."""

    index: int
    feed: list[int]          # tokens still to decode (the prompt's rest, then one picked token)
    pos: int                 # position of feed[0]
    cells: int               # KV cells reserved for this prompt
    out: bytes = b""
    n_out: int = 0
    row: int = -1            # this slot's logits row in the last batch
    picked: list[int] = field(default_factory=list)


def shared_prefix(token_lists: Sequence[Sequence[int]]) -> list[int]:
    """The longest token prefix of all lists, leaving at least one token of each to decode."""
    first = token_lists[0]
    n = min(len(t) for t in token_lists) - 1
    for tokens in token_lists[1:]:
        i = 0
        while i < n and tokens[i] == first[i]:
            i += 1
        n = i
    return list(first[:max(n, 0)])


class BatchDecoder:
    """Up to `n_slots` greedy answers decoded at once in a context of `n_cells` KV cells."""

    def __init__(self, llm, n_slots: int, n_cells: int, threads: int):
        import llama_cpp
        from llama_cpp import _internals
        from llama_cpp._utils import suppress_stdout_stderr

        # The one-at-a-time context's settings (flash attention off among them), resized.
        params = type(llm.context_params).from_buffer_copy(llm.context_params)
        params.n_ctx = params.n_batch = n_cells
        params.n_ubatch = min(512, n_cells)
        params.n_seq_max = n_slots + 1           # the prefix sequence and the slots
        params.kv_unified = True                 # slots share the prefix's cells
        params.swa_full = True                   # Gemma 3's sliding-window cache keeps every cell
        params.n_threads = params.n_threads_batch = threads
        params.no_perf = True
        try:
            with suppress_stdout_stderr(disable=False):   # llama.cpp's C-level context log lines
                self.ctx = _internals.LlamaContext(model=llm._model, params=params, verbose=False)
        except ValueError as exc:
            raise KmmError(f"llama.cpp could not make a context for {n_slots} parallel answers: {exc}") from None
        llm._stack.callback(self.ctx.close)
        self.n_cells = llama_cpp.llama_n_ctx(self.ctx.ctx)
        self.batch = _internals.LlamaBatch(n_tokens=self.n_cells, embd=0, n_seq_max=1, verbose=False)
        llm._stack.callback(self.batch.close)
        self.llm, self.n_slots, self.n_vocab = llm, n_slots, llm.n_vocab()
        self._prefix: list[int] = []

    def generate(self, token_lists: Sequence[list[int]], max_tokens: int, stop: Sequence[str],
                 eos: set[int], progress: Callable[[int], None] | None = None) -> list[str]:
        """Greedy answers for the tokenized prompts, in their order; `progress(1)` per answer."""
        import llama_cpp

        outputs = [""] * len(token_lists)
        if not token_lists or max_tokens <= 0:
            return outputs
        mem = self.ctx.memory
        n_prefix = self._load_prefix(shared_prefix(token_lists))
        waiting = deque(range(len(token_lists)))
        free = list(range(self.n_slots, 0, -1))
        active: dict[int, _Answer] = {}
        reserved = n_prefix
        try:
            while waiting or active:
                # A prompt takes a free slot when its tokens and answer fit the cells left.
                while free and waiting and reserved + len(token_lists[waiting[0]]) - n_prefix + max_tokens <= self.n_cells:
                    i = waiting.popleft()
                    ans = _Answer(i, token_lists[i][n_prefix:], n_prefix, len(token_lists[i]) - n_prefix + max_tokens)
                    active[free.pop()] = ans
                    reserved += ans.cells
                self._decode(active)
                for seq, ans in list(active.items()):
                    tok = int(np.argmax(np.ctypeslib.as_array(
                        llama_cpp.llama_get_logits_ith(self.ctx.ctx, ans.row), shape=(self.n_vocab,))))
                    if self._take(ans, tok, max_tokens, stop, eos):
                        outputs[ans.index] = clean_output(ans.out.decode("utf-8", errors="ignore"), stop)
                        del active[seq]
                        llama_cpp.llama_memory_seq_rm(mem, seq, n_prefix, -1)
                        free.append(seq)
                        reserved -= ans.cells
                        if progress:
                            progress(1)
        finally:
            for seq in range(1, self.n_slots + 1):
                llama_cpp.llama_memory_seq_rm(mem, seq, -1, -1)
        return outputs

    def _take(self, ans: _Answer, tok: int, max_tokens: int, stop: Sequence[str], eos: set[int]) -> bool:
        """Add the picked token to the answer; True when the answer is complete."""
        if tok in eos:
            return True
        ans.out += self.llm.detokenize([tok])
        ans.n_out += 1
        if ans.n_out == max_tokens or any(s in ans.out.decode("utf-8", errors="ignore") for s in stop):
            return True
        ans.pos += len(ans.feed)
        ans.feed = [tok]
        return False

    def _decode(self, active: dict[int, _Answer]) -> None:
        """One llama_decode of every active slot's pending tokens, logits at each slot's last one."""
        import llama_cpp

        b = self.batch.batch
        j = 0
        for seq, ans in active.items():
            for k, tok in enumerate(ans.feed):
                b.token[j], b.pos[j], b.n_seq_id[j], b.logits[j] = tok, ans.pos + k, 1, False
                b.seq_id[j][0] = seq
                j += 1
            b.logits[j - 1] = True
            ans.row = j - 1
        b.n_tokens = j
        rc = llama_cpp.llama_decode(self.ctx.ctx, b)
        if rc != 0:
            raise KmmError(f"llama.cpp could not decode a batch of {j} tokens (code {rc})")

    def _load_prefix(self, prefix: list[int]) -> int:
        """Make sequence 0 hold exactly `prefix` (keeping what it shares with the last one) and
        share it with every slot."""
        import llama_cpp

        mem = self.ctx.memory
        keep = 0
        while keep < min(len(prefix), len(self._prefix)) and prefix[keep] == self._prefix[keep]:
            keep += 1
        llama_cpp.llama_memory_seq_rm(mem, PREFIX_SEQ, keep, -1)
        self._prefix = prefix[:keep]
        if keep < len(prefix):
            self._decode({PREFIX_SEQ: _Answer(-1, prefix[keep:], keep, 0)})
            self._prefix = list(prefix)
        for seq in range(1, self.n_slots + 1):
            llama_cpp.llama_memory_seq_cp(mem, PREFIX_SEQ, seq, -1, -1)
        return len(prefix)
