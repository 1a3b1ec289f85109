"""Batched llama.cpp decoding (several answers per llama_decode, the shared prefix decoded once)
against the one-at-a-time path, on the real bundled models, with and without a LoRA adapter.

In exact mode (a KV stream per sequence, a new prompt's rest decoded in one call and answer tokens
one per sequence) SmolLM2's greedy answers equal the one-at-a-time ones on all 200 questions: the
batching itself (positions, masks, the shared prefix, slots refilled and reused) adds nothing.
Gemma 3's do not quite (195 of 200 measured), and the cause lies outside the batching: asking
Gemma the same 300 questions one at a time in another order (which changes which earlier prompt
each one follows, and nothing else) changed 2-6 of its one-at-a-time answers (4 with llama.cpp's
repacked weights). Its K-quant tensors (Q4_K, Q6_K) are the cause: their matmuls' results depend on
how many rows a call holds, so a reused cell differs a little from one computed afresh (Gemma
requantized to Q4_1, Q5_0 or Q8_0 in every layer reuses cells bit for bit, as SmolLM2 does).

The fast mode (one cache shared by all sequences, every slot's pending tokens in one call) also
adds the same attention terms in another order: 192 of 200 equal for SmolLM2 and 191 for Gemma 3
with unrepacked weights; the bound below is far above what a batching mistake (a wrong position,
mask or prefix) gives. llama.cpp's repacked weight kernels (Gemma's Q4_K, Q5_0 and Q8_0 tensors,
not SmolLM2's Q4_1) change kernels with the row count too, so the agreement tests load the weights
unrepacked; bench/check_speed.py reports the agreement with llama.cpp's default kernels.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import bundled_model, llama_cpp_usable
from kmismatch_lite import cards
from kmismatch_lite.qa import data, prompts
from kmismatch_lite.backends.llamacpp_batch import shared_prefix
from kmismatch_lite.errors import KmmError

STUDENT, TEACHER = "smollm2-135m-instruct", "gemma-3-270m"
N_QUESTIONS = 200
MIN_AGREEMENT = 0.9          # fast mode
EXACT_AGREEMENT = {STUDENT: 1.0, TEACHER: 0.95}
# A random LoRA on every layer's v projection: (layers, in, out, scale of B) for each bundled model;
# the scale changes answers without turning them into noise (at B ~ N(0, 1) SmolLM2 answered "C",
# "Ced", "Cen": near-ties that any rounding change flips).
V_PROJ = {STUDENT: (30, 576, 192, 0.3), TEACHER: (18, 640, 256, 0.1)}


def test_shared_prefix_leaves_a_token_of_each_prompt():
    assert shared_prefix([[1, 2, 3, 4], [1, 2, 3, 5]]) == [1, 2, 3]
    assert shared_prefix([[1, 2, 3], [1, 2, 3, 4]]) == [1, 2]        # the shorter keeps one token
    assert shared_prefix([[1, 2], [3, 4]]) == []
    assert shared_prefix([[7, 8, 9]]) == [7, 8]


def _model(name: str) -> cards.Model:
    for why in (llama_cpp_usable(), bundled_model(name)):
        if why:
            pytest.skip(why)
    return cards.resolve(name)


def _answers(model, rendered, *, parallel: int, adapter=None, max_tokens=prompts.MAX_TOKENS,
             stop=tuple(prompts.STOP), **options) -> list[str]:
    from kmismatch_lite.backends.llamacpp import LlamaCppGenerator

    gen = LlamaCppGenerator(model, adapter=adapter, parallel=parallel, **options)
    try:
        return gen.generate(rendered, max_tokens=max_tokens, stop=list(stop))
    finally:
        gen.close()


def _random_adapter(name: str, model, path):
    from kmismatch_lite.formats.export_gguf import export_lora_gguf

    n_layers, n_in, n_out, scale = V_PROJ[name]
    rng = np.random.default_rng(0)
    lora = {f"model.layers.{i}.self_attn.v_proj": (
        rng.standard_normal((4, n_in)).astype(np.float32) / np.sqrt(n_in),
        (scale * rng.standard_normal((n_out, 4))).astype(np.float32)) for i in range(n_layers)}
    return export_lora_gguf(lora, alpha=4.0, base=model, out_path=path)


def _agree(a: list[str], b: list[str]) -> float:
    return sum(x == y for x, y in zip(a, b)) / len(a)


@pytest.fixture
def same_kernels(monkeypatch):
    """Load GGUF weights without repacking, so every batch shape runs the same matmul kernels."""
    from llama_cpp import llama_cpp as low_level

    default = low_level.llama_model_default_params

    def unrepacked():
        params = default()
        params.use_extra_bufts = False
        return params

    monkeypatch.setattr(low_level, "llama_model_default_params", unrepacked)


@pytest.fixture(scope="module")
def questions():
    qs = data.load("geonames", seed=0)
    return qs, qs.test[:N_QUESTIONS]


@pytest.mark.integration
@pytest.mark.parametrize("name", [STUDENT, TEACHER])
def test_batched_matches_one_at_a_time_few_shot(name, questions, same_kernels):
    model = _model(name)
    qs, test = questions
    template = prompts.few_shot(qs.exemplars, seed=0)
    rendered = [template.render(q.question) for q in test]
    single = _answers(model, rendered, parallel=1)
    for exact, bound in ((True, EXACT_AGREEMENT[name]), (False, MIN_AGREEMENT)):
        batched = _answers(model, rendered, parallel=8, exact=exact)
        diffs = [(a, b) for a, b in zip(single, batched) if a != b]
        print(f"\n{name} few-shot, exact={exact}: {len(rendered) - len(diffs)}/{len(rendered)} equal; differing: {diffs}")
        assert _agree(single, batched) >= bound, diffs


@pytest.mark.integration
@pytest.mark.parametrize("name", [STUDENT, TEACHER])
def test_batched_matches_one_at_a_time_with_adapter(name, questions, tmp_path, same_kernels):
    """With a LoRA applied in both contexts. Few-shot prompts keep answers short, as a trained
    adapter's are: with a random LoRA, Gemma's free-form zero-shot answers (16 tokens of prose)
    let every rounding difference grow into another continuation (139 of 200 equal, measured)."""
    model = _model(name)
    adapter = _random_adapter(name, model, tmp_path / "lora.gguf")
    qs, test = questions
    template = prompts.few_shot(qs.exemplars, seed=0)
    rendered = [template.render(q.question) for q in test]
    base = _answers(model, rendered, parallel=8)
    single = _answers(model, rendered, parallel=1, adapter=adapter)
    for exact, bound in ((True, EXACT_AGREEMENT[name]), (False, MIN_AGREEMENT)):
        batched = _answers(model, rendered, parallel=8, adapter=adapter, exact=exact)
        diffs = [(a, b) for a, b in zip(single, batched) if a != b]
        print(f"\n{name} few-shot + LoRA, exact={exact}: {len(rendered) - len(diffs)}/{len(rendered)} equal, "
              f"{_agree(base, batched):.2f} equal to the base; differing: {diffs}")
        assert _agree(base, batched) < 0.9              # the adapter is applied in the batched context
        assert _agree(single, batched) >= bound, diffs


@pytest.mark.integration
@pytest.mark.parametrize("exact", [True, False])
def test_slots_refill_when_answers_end_at_different_lengths(questions, exact):
    """Answers of 1 to 12 tokens through 2 slots: each ended slot takes the next prompt at once,
    answers stay in prompt order, progress counts each answer, and a second call (prompts in
    another order, so slots keep other cells) reuses the context cleanly."""
    from kmismatch_lite.backends.llamacpp import LlamaCppGenerator

    model = _model(STUDENT)
    qs, test = questions
    template = prompts.few_shot(qs.exemplars, seed=0)
    long_ones = ["Count: 1, 2, 3, 4, 5, 6,", "The alphabet: a b c d e f"]   # run to the token cap
    rendered = [template.render(q.question) for q in test[:5]] + long_ones + [template.render(test[5].question)]
    single = _answers(model, rendered, parallel=1, max_tokens=12)
    gen = LlamaCppGenerator(model, parallel=2, exact=exact)
    done: list[int] = []
    try:
        first = gen.generate(rendered, max_tokens=12, stop=prompts.STOP, progress=done.append)
        again = gen.generate(rendered[::-1], max_tokens=12, stop=prompts.STOP)[::-1]
        lengths = {len(gen.llm.tokenize(a.encode(), add_bos=False)) for a in single}
    finally:
        gen.close()
    assert min(lengths) <= 3 and max(lengths) >= 10, single        # answers end at different lengths
    assert first == single and again == single
    assert done == [1] * len(rendered)


@pytest.mark.integration
def test_context_grows_for_longer_prompts(questions):
    """The batch context is sized by the first call's prompts (256 cells a sequence here); a later
    call with prompts too long for it gets a larger one, and the same answers as one at a time.
    The fast mode sizes its shared cache the same way, with the prefix counted once."""
    model = _model(STUDENT)
    qs, test = questions
    short = [prompts.zero_shot(q.question) for q in test[:6]]
    template = prompts.few_shot(qs.exemplars, k=16, seed=0)          # 16 exemplars: over 256 tokens
    long = [template.render(q.question) for q in test[:6]]
    from kmismatch_lite.backends.llamacpp import LlamaCppGenerator

    gen = LlamaCppGenerator(model, parallel=4, exact=True)
    try:
        first = gen.generate(short, max_tokens=16, stop=prompts.STOP)
        streams = gen._batched.n_slots + 1          # the prefix's and each slot's
        per_seq = gen._batched.n_cells // streams
        second = gen.generate(long, max_tokens=16, stop=prompts.STOP)
        assert len(gen.llm.tokenize(long[0].encode())) > per_seq and gen._batched.n_cells // streams > per_seq
    finally:
        gen.close()
    assert first == _answers(model, short, parallel=1) and second == _answers(model, long, parallel=1)
    fast = LlamaCppGenerator(model, parallel=4)
    try:
        assert len(fast.generate(short, max_tokens=16, stop=prompts.STOP)) == len(short)
        cells = fast._batched.n_cells
        assert len(fast.generate(long, max_tokens=16, stop=prompts.STOP)) == len(long)
        assert fast._batched.n_cells > cells
    finally:
        fast.close()


@pytest.mark.integration
@pytest.mark.parametrize("parallel", [1, 8])
def test_prompt_longer_than_the_context_is_a_clear_error(parallel):
    model = _model(STUDENT)
    long_prompt = prompts.zero_shot("Which city? " * 200)
    with pytest.raises(KmmError, match=r"prompt of \d+ tokens does not fit the context of 512"):
        _answers(model, [prompts.zero_shot("Where is Paris?"), long_prompt], parallel=parallel, n_ctx=512)


# --- the form every evaluated condition is answered in ---

# Zero-shot answers of 200 test questions with a LoRA trained as the quickstart trains (own few-shot
# answers -> gold or "I don't know", 2 epochs at 5e-4, linear decay), llama.cpp's default kernels,
# the default batched mode (8 at once) against one at a time, measured on the 2-core VM: SmolLM2
# 200 of 200 equal (exact mode 200), Gemma 3 as the student 196 of 200 (exact mode 193: its K-quant
# kernels, not the batching, module docstring). The bars are those figures.
EVALUATED_AGREEMENT = {STUDENT: 1.0, TEACHER: 0.98}


def _trained_adapter(model, questions, tmp_path):
    from kmismatch_lite.finetune import LoraSettings, finetune
    from kmismatch_lite.qa import scoring

    qs, _ = questions
    train = qs.train[:120]
    template = prompts.few_shot(qs.exemplars, seed=0)
    own = _answers(model, [template.render(q.question) for q in train], parallel=8)
    examples = [{"question": q.question,
                 "target": q.answers[0] if scoring.verdict(a, q.answers) == scoring.CORRECT else scoring.ABSTAIN_TARGET}
                for q, a in zip(train, own)]
    settings = LoraSettings(learning_rate=5e-4, epochs=2, batch_size=8, lr_schedule="linear")
    finetune(model.name, examples, tmp_path / "ft", settings=settings)
    return tmp_path / "ft" / "adapter.gguf"


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("name", [STUDENT, TEACHER])
def test_the_evaluated_form_matches_one_at_a_time(name, questions, tmp_path):
    pytest.importorskip("peft", reason="needs the torch extra")
    model = _model(name)
    adapter = _trained_adapter(model, questions, tmp_path)
    _, test = questions
    rendered = [prompts.PromptTemplate().render(q.question) for q in test]
    single = _answers(model, rendered, parallel=1, adapter=adapter)
    # parallel=None: the generator's default, as `kmm run` evaluates (8 at once on a CPU).
    batched = _answers(model, rendered, parallel=None, adapter=adapter)
    exact = _answers(model, rendered, parallel=None, adapter=adapter, exact=True)
    diffs = [(a, b) for a, b in zip(single, batched) if a != b]
    print(f"\n{name} zero-shot + trained LoRA: fast {len(rendered) - len(diffs)}/{len(rendered)} equal, "
          f"exact {sum(a == b for a, b in zip(single, exact))}/{len(rendered)}; differing: {diffs}")
    assert _agree(single, batched) >= EVALUATED_AGREEMENT[name], diffs
