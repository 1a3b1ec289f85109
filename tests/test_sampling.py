"""Seeded temperature sampling: the sampler itself (fast), and llama.cpp's sampled answers on the
real bundled student: reproducible from the seed, different under another seed, and independent
of the batch (order, other prompts, `parallel`)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import bundled_model, llama_cpp_usable
from kmismatch_lite.errors import KmmError
from kmismatch_lite.qa.sampling import GREEDY, Sampling, sample

STUDENT = "smollm2-135m-instruct"
N_PROMPTS = 30
HOT = Sampling(1.0, seed=1)


def test_greedy_is_temperature_zero_and_picks_the_argmax():
    assert GREEDY.greedy and not HOT.greedy
    assert GREEDY.picker("any prompt")(np.array([0.1, 3.0, -2.0, 2.9])) == 1
    assert GREEDY.describe() == {"temperature": 0.0, "method": "greedy"}
    assert HOT.describe()["truncation"] == "none" and HOT.describe()["seed"] == 1


def test_a_negative_or_nan_temperature_is_refused():
    for bad in (-0.5, float("nan"), float("inf")):
        with pytest.raises(KmmError, match="temperature"):
            Sampling(bad)


def test_sample_follows_the_softmax_at_the_temperature():
    rng = np.random.default_rng(0)
    logits = np.array([0.0, np.log(3.0), -np.inf, -50.0])
    draws = [sample(logits, 1.0, rng) for _ in range(20000)]
    assert 0.74 < draws.count(1) / len(draws) < 0.76 and draws.count(2) == 0
    cold = [sample(logits, 0.5, rng) for _ in range(20000)]  # p(1) = 9 / 10 at T = 0.5
    assert 0.89 < cold.count(1) / len(cold) < 0.91


def test_each_prompt_draws_from_its_own_stream_given_by_the_seed_and_the_text():
    logits = np.zeros(50000)

    def draws(sampling, prompt):
        pick = sampling.picker(prompt)
        return [pick(logits) for _ in range(5)]

    assert draws(Sampling(1.0, 1), "a") == draws(Sampling(1.0, 1), "a")
    assert draws(Sampling(1.0, 1), "a") != draws(Sampling(1.0, 2), "a")
    assert draws(Sampling(1.0, 1), "a") != draws(Sampling(1.0, 1), "b")
    assert 0 <= Sampling(0.5, 2**40).prompt_seed("x") < 2**31


# --- llama.cpp, the real student ---

@pytest.fixture(scope="module")
def student_prompts():
    for why in (llama_cpp_usable(), bundled_model(STUDENT)):
        if why:
            pytest.skip(why)
    from kmismatch_lite import cards
    from kmismatch_lite.qa import data, prompts

    qs = data.load("geonames")
    template = prompts.few_shot(qs.exemplars)
    return cards.resolve(STUDENT), [template.render(q.question) for q in qs.test[:N_PROMPTS]]


def _answers(model, batch, *, parallel=1, **kwargs):
    from kmismatch_lite.qa import prompts
    from kmismatch_lite.backends.llamacpp import LlamaCppGenerator

    gen = LlamaCppGenerator(model, parallel=parallel)
    try:
        return gen.generate(batch, max_tokens=prompts.MAX_TOKENS, stop=prompts.STOP, **kwargs)
    finally:
        gen.close()


@pytest.mark.integration
def test_llamacpp_sampled_answers_depend_on_the_seed_and_not_on_the_batch(student_prompts):
    model, batch = student_prompts
    first = _answers(model, batch, sampling=HOT)
    assert all(a and "\n" not in a for a in first)
    assert _answers(model, batch[9::-1], sampling=HOT)[::-1] == first[:10]
    assert _answers(model, batch[20:25], sampling=HOT) == first[20:25]
    assert _answers(model, batch[:12], parallel=4, sampling=HOT) == first[:12]
    other = _answers(model, batch, sampling=Sampling(1.0, seed=2))
    assert sum(a != b for a, b in zip(first, other)) >= 3, list(zip(first, other))


@pytest.mark.integration
def test_llamacpp_temperature_zero_is_the_greedy_path(student_prompts):
    model, batch = student_prompts
    batch = batch[:10]
    greedy = _answers(model, batch)
    assert _answers(model, batch, sampling=Sampling(0.0, seed=9)) == greedy
    assert _answers(model, batch, sampling=Sampling(1.0, seed=9)) != greedy
