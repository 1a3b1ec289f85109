"""Batched greedy decoding in llama.cpp: several prompts answered together in one context.

N slots are sequences. The prompts' shared token prefix (few-shot exemplars, or the start of the
zero-shot form) is decoded once into sequence 0 and shared with every slot. Prompts are taken in
token order, so a slot's next prompt mostly shares more than that prefix with its last one (the
question template): the slot keeps those cells and decodes only the rest, as the one-at-a-time path
keeps the prefix it shares with the previous prompt. A slot whose answer ends (stop string, end of
generation, token cap) takes the next prompt.

Two layouts of the KV cache:

- fast (the default): one cache shared by all sequences; a step decodes, in one `llama_decode`,
  every busy slot's pending tokens (a new prompt's rest, or the last token picked for an answer).
  A sequence's cells then lie among other sequences' cells, so attention adds the same terms in
  another order, and its matmuls see other row counts than the one-at-a-time path's (whose
  answer tokens are decoded alone), which changes the rounding of K-quant and repacked weight
  kernels. The last bits of the logits change, and a near-tie between two tokens flips now and then
  (bench/check_speed.py counts them).
- exact: a KV stream per sequence (llama.cpp's non-unified cache), the prefix copied into each
  stream, and each call decodes slots with as many pending tokens: a new prompt's rest in one call,
  answer tokens one per sequence, as the one-at-a-time path does. Attention then runs the same
  sums, and SmolLM2's greedy answers equal the one-at-a-time ones; Gemma 3's differ on a few
  near-ties, as its one-at-a-time answers do when only the order of the questions changes: its
  K-quant matmuls (Q4_K, Q6_K) round differently with the number of rows in a call, so a cell
  computed with another prompt differs in its last bits. It makes more, smaller calls (llama.cpp
  splits a call whose sequences have unequal token counts into several), so it is slower.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from kmismatch_lite.backends import common_length
from kmismatch_lite.errors import KmmError
from kmismatch_lite.qa.prompts import clean_output

PREFIX_SEQ = 0
CELL_BLOCK = 256          # contexts hold a multiple of this many cells (exact: per sequence)


@dataclass
class _Slot:
    """One sequence: the tokens whose cells the cache holds for it, and the answer in progress."""

    seq: int
    cached: list[int]
    index: int = -1          # the prompt answered, -1 when free
    feed: list[int] = field(default_factory=list)  # to decode: the prompt's rest, or one picked token
    out: bytes = b""
    n_out: int = 0


def shared_prefix(token_lists: Sequence[Sequence[int]]) -> list[int]:
    """The longest token prefix of all lists, leaving at least one token of each to decode."""
    first = token_lists[0]
    n = max(min(len(t) for t in token_lists) - 1, 0)
    for tokens in token_lists[1:]:
        n = common_length(first[:n], tokens)
    return list(first[:n])


class BatchDecoder:
    """Up to `n_slots` greedy answers decoded at once. The context is made at the first call with
    room for every slot's longest prompt and answer, and made again when a later call needs more;
    `on_context(ctx)` is called with each new context (to apply a LoRA)."""

    def __init__(self, llm, n_slots: int, threads: int, on_context: Callable | None = None, exact: bool = False):
        self.llm, self.n_slots, self.threads, self.on_context = llm, n_slots, threads, on_context
        self.exact = exact
        self.n_vocab = llm.n_vocab()
        self.ctx = self.batch = None
        self.n_cells = self.n_batch = 0
        self._prefix: list[int] = []

    def _context(self, n_cells: int, n_batch: int) -> None:
        """A context of at least `n_cells` KV cells (exact: split evenly into the sequences'
        streams) taking `n_batch` tokens a call; made anew when the present one is smaller."""
        from llama_cpp import _internals
        from llama_cpp._utils import suppress_stdout_stderr

        if self.ctx is not None and n_cells <= self.n_cells and n_batch <= self.n_batch:
            return
        self.close()
        n_seq = self.n_slots + 1                  # the prefix sequence and the slots
        block = CELL_BLOCK * (n_seq if self.exact else 1)
        n_cells = -(-n_cells // block) * block
        # The one-at-a-time context's settings (flash attention off among them), resized.
        params = type(self.llm.context_params).from_buffer_copy(self.llm.context_params)
        params.n_ctx = n_cells
        params.n_batch = n_batch
        params.n_ubatch = min(512, n_batch)
        params.n_seq_max = n_seq
        params.kv_unified = not self.exact        # exact: a stream of cells per sequence
        params.swa_full = True                    # Gemma 3's sliding-window cache keeps every cell
        params.n_threads = params.n_threads_batch = self.threads
        params.no_perf = True
        try:
            with suppress_stdout_stderr(disable=False):   # llama.cpp's C-level context log lines
                ctx = _internals.LlamaContext(model=self.llm._model, params=params, verbose=False)
        except ValueError as exc:
            raise KmmError(f"llama.cpp could not make a context for {self.n_slots} parallel answers: {exc}") from None
        self.ctx, self.n_cells, self.n_batch, self._prefix = ctx, n_cells, n_batch, []
        self.batch = _internals.LlamaBatch(n_tokens=n_batch, embd=0, n_seq_max=1, verbose=False)
        if self.on_context is not None:
            self.on_context(ctx.ctx)

    def close(self) -> None:
        for obj in (self.batch, self.ctx):
            if obj is not None:
                obj.close()
        self.ctx = self.batch = None

    def generate(self, token_lists: Sequence[list[int]], max_tokens: int, stop: Sequence[str],
                 eos: set[int], progress: Callable[[int], None] | None = None) -> list[str]:
        """Greedy answers for the tokenized prompts, in their order; `progress(1)` per answer."""
        import llama_cpp

        outputs = [""] * len(token_lists)
        if not token_lists or max_tokens <= 0:
            return outputs
        prefix = shared_prefix(token_lists)
        longest = max(len(t) for t in token_lists) + max_tokens
        if self.exact:      # every stream holds the prefix, the longest prompt's rest and an answer
            per_seq = -(-longest // CELL_BLOCK) * CELL_BLOCK
            self._context(per_seq * (self.n_slots + 1), per_seq * self.n_slots)
        else:               # the prefix once; each slot's own cells after it, with room to spare
            own = longest - len(prefix)
            self._context(len(prefix) + 3 * self.n_slots * own // 2, self.n_slots * own)
        mem = self.ctx.memory
        self._load_prefix(prefix)
        waiting = deque(sorted(range(len(token_lists)), key=token_lists.__getitem__))
        slots = [_Slot(seq, list(prefix)) for seq in range(1, self.n_slots + 1)]
        try:
            while True:
                for slot in slots:
                    if slot.index < 0 and waiting:
                        self._start(slot, waiting.popleft(), token_lists)
                busy = [s for s in slots if s.index >= 0]
                if not busy:
                    break
                steps = [busy]
                if self.exact:
                    # One call per count of tokens left: a new prompt's rest decoded in one call
                    # (as the one-at-a-time path does), the answers' next tokens in another.
                    groups: dict[int, list[_Slot]] = {}
                    for slot in busy:
                        groups.setdefault(len(slot.feed), []).append(slot)
                    steps = [groups[n] for n in sorted(groups, reverse=True)]
                for step in steps:
                    for slot, tok in zip(step, self._step(step)):
                        if self._take(slot, int(tok), max_tokens, stop, eos):
                            outputs[slot.index] = clean_output(slot.out.decode("utf-8", errors="ignore"), stop)
                            slot.index = -1
                            if progress:
                                progress(1)
        finally:
            for seq in range(1, self.n_slots + 1):
                llama_cpp.llama_memory_seq_rm(mem, seq, -1, -1)
        return outputs

    def _start(self, slot: _Slot, index: int, token_lists: Sequence[list[int]]) -> None:
        """Give the slot a prompt: keep the cells it shares with the slot's last one."""
        import llama_cpp

        tokens = token_lists[index]
        keep = common_length(slot.cached, tokens[:-1])
        llama_cpp.llama_memory_seq_rm(self.ctx.memory, slot.seq, keep, -1)
        del slot.cached[keep:]
        slot.index, slot.feed, slot.out, slot.n_out = index, list(tokens[keep:]), b"", 0

    def _take(self, slot: _Slot, tok: int, max_tokens: int, stop: Sequence[str], eos: set[int]) -> bool:
        """Add the picked token to the slot's answer; True when the answer is complete."""
        if tok in eos:
            return True
        slot.out += self.llm.detokenize([tok])
        slot.n_out += 1
        if slot.n_out == max_tokens or any(s in slot.out.decode("utf-8", errors="ignore") for s in stop):
            return True
        slot.feed.append(tok)
        return False

    def _step(self, slots: list[_Slot]) -> np.ndarray:
        """One llama_decode of the pending tokens of each slot (in sequence order); the argmax of
        the logits at each slot's last one."""
        import llama_cpp

        b = self.batch.batch
        j = 0
        for slot in slots:
            for tok in slot.feed:
                b.token[j], b.pos[j], b.n_seq_id[j], b.logits[j] = tok, len(slot.cached), 1, False
                b.seq_id[j][0] = slot.seq
                slot.cached.append(tok)
                j += 1
            b.logits[j - 1] = True
            slot.feed.clear()
        self._decode(j)
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(self.ctx.ctx), shape=(len(slots), self.n_vocab))
        return logits.argmax(axis=1)

    def _decode(self, n_tokens: int) -> None:
        import llama_cpp

        self.batch.batch.n_tokens = n_tokens
        rc = llama_cpp.llama_decode(self.ctx.ctx, self.batch.batch)
        if rc != 0:
            raise KmmError(f"llama.cpp could not decode a batch of {n_tokens} tokens (code {rc})")

    def _load_prefix(self, prefix: list[int]) -> None:
        """Make sequence 0 hold exactly `prefix` (keeping what it shares with the last one) and
        share it with every slot (exact: copy its stream into theirs)."""
        import llama_cpp

        mem = self.ctx.memory
        keep = common_length(prefix, self._prefix)
        llama_cpp.llama_memory_seq_rm(mem, PREFIX_SEQ, keep, -1)
        self._prefix = prefix[:keep]
        b, size = self.batch.batch, self.batch._n_tokens
        for start in range(keep, len(prefix), size):
            part = prefix[start:start + size]
            for j, tok in enumerate(part):
                b.token[j], b.pos[j], b.n_seq_id[j], b.logits[j] = tok, start + j, 1, False
                b.seq_id[j][0] = PREFIX_SEQ
            self._decode(len(part))
        self._prefix = list(prefix)
        for seq in range(1, self.n_slots + 1):
            llama_cpp.llama_memory_seq_cp(mem, PREFIX_SEQ, seq, -1, -1)
