"""`kmm check`: answer questions with a model, score the answers, write samples and metrics."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from kmismatch_lite import cards
from kmismatch_lite.qa import data, prompts, scoring
from kmismatch_lite.backends import generator_class
from kmismatch_lite.qa.data import Question
from kmismatch_lite.errors import KmmError
from kmismatch_lite.io import sha256_file, sha256_text, write_json, write_jsonl
from kmismatch_lite.qa.sampling import GREEDY, Sampling

# The versioned forms of a check's metrics.json (and --json) and of a comparison's compare.json.
SCHEMA = "kmm-check/1"
COMPARE_SCHEMA = "kmm-compare/1"
EXIT_FAILED = 3  # a --fail-* gate failed; 1 stays bad input and 2 a usage error


@dataclass
class CheckResult:
    """Per-question samples, the tally and the metrics dictionary written as metrics.json."""

    samples: list[dict]
    tally: scoring.Tally
    metrics: dict[str, Any] = field(default_factory=dict)


def score(questions: Sequence[Question], outputs: Sequence[str]) -> tuple[list[dict], scoring.Tally]:
    """One sample row per question (id, question, answers, output, verdict) and their tally."""
    samples, exact = [], []
    for q, out in zip(questions, outputs):
        samples.append({"id": q.id, "question": q.question, "answers": q.answers,
                        "output": out, "verdict": scoring.verdict(out, q.answers)})
        exact.append(scoring.exact_match(out, q.answers))
    return samples, scoring.tally([s["verdict"] for s in samples], exact)


def answer(generator, template: prompts.PromptTemplate, questions: Sequence[Question],
           progress: Callable[[int], None] | None = None, sampling: Sampling = GREEDY,
           max_tokens: int = prompts.MAX_TOKENS) -> list[str]:
    """Answers (greedy, or sampled as `sampling` says) for the questions with the template,
    through any generator backend."""
    rendered = [template.render(q.question) for q in questions]
    return generator.generate(rendered, max_tokens=max_tokens, stop=prompts.STOP, progress=progress,
                              sampling=sampling)


def generation_backend(served: bool, backend: str) -> str:
    """A served model is answered by its server: the default backend becomes `openai`."""
    return "openai" if served and backend == "llamacpp" else backend


def make_generator(backend: str, model: cards.Model, adapter: Path | None, seed: int, options: dict):
    return generator_class(backend)(model, adapter=adapter, seed=seed, **options)


def evaluate(model: cards.Model, questions: Sequence[Question], template: prompts.PromptTemplate, *,
             backend: str = "llamacpp", adapter: Path | None = None, seed: int = 0,
             options: dict | None = None, progress_factory=None, label: str | None = None,
             sampling: Sampling = GREEDY, max_tokens: int = prompts.MAX_TOKENS) -> CheckResult:
    """Answer `questions` with the model (and adapter) through a backend, then score them; the
    metrics record the sampling settings."""
    backend = generation_backend(model.served, backend)
    gen = make_generator(backend, model, adapter, seed, options or {})
    t0 = time.perf_counter()
    try:
        if progress_factory:
            with progress_factory(f"{label or model.name} answering", len(questions)) as advance:
                outputs = answer(gen, template, questions, advance, sampling, max_tokens)
        else:
            outputs = answer(gen, template, questions, sampling=sampling, max_tokens=max_tokens)
        info = gen.info()
    finally:
        gen.close()
    seconds = time.perf_counter() - t0
    samples, tally = score(questions, outputs)
    metrics = {
        **tally.as_dict(),
        "model": model.name,
        "model_file": str(model.gguf_path) if model.gguf_path else model.url,
        "model_sha256": sha256_file(model.gguf_path) if model.gguf_path else None,
        "adapter": str(adapter) if adapter else None,
        "adapter_sha256": sha256_file(adapter) if adapter else None,
        "backend": info,
        "prompt": template.describe(),
        "prompt_sha256": sha256_text(template.describe()),
        "prompt_style": (f"{template.shots}-shot" if template.shots else "zero-shot")
                        + (" chat" if isinstance(template, prompts.ChatPromptTemplate) else ""),
        "seed": seed,
        "sampling": sampling.describe(),
        "max_tokens": max_tokens,
        "seconds": round(seconds, 3),
        "questions_per_second": round(len(questions) / seconds, 3) if seconds else None,
    }
    return CheckResult(samples, tally, metrics)


def default_split(dataset: str) -> str:
    """A local question file is checked whole; a built-in set on its held-out test split."""
    return data.ALL if data.is_local(dataset) else "test"


def exemplars_for(qs: data.QuestionSet, split: str, seed: int) -> list[Question]:
    """Few-shot exemplars that are never among the questions checked: the set's own exemplars
    split, or, when the checked split contains it, the built-in geonames exemplars."""
    if split in (data.ALL, "exemplars"):
        return data.load("geonames", seed=seed).exemplars
    return qs.exemplars


def read_exemplars(spec: str) -> list[Question]:
    """The user's own few-shot examples: a question file in any data-set format (`question`,
    `answers`; the first answer is the one the prompt shows)."""
    kind, rest = data.parse_spec(spec)
    if kind not in data.LOCAL_KINDS or not rest:
        raise KmmError(f"--exemplars takes a local question file (jsonl:PATH, csv:PATH, parquet:PATH), got '{spec}'")
    found = data.load_file(Path(rest), kind)
    if not found:
        raise KmmError(f"exemplars file {rest} has no rows")
    return found


def chat_template(model: cards.Model, backend: str, exemplars: Sequence[Question]) -> prompts.ChatPromptTemplate:
    """The chat prompt: the model's own template (llama.cpp backend only), exemplars as earlier turns."""
    if backend != "llamacpp":
        raise KmmError(f"chat prompts are applied by the llamacpp backend, not {backend}")
    from kmismatch_lite.backends.llamacpp import chat_formatter

    return prompts.ChatPromptTemplate(chat_formatter(model), tuple((q.question, q.answers[0]) for q in exemplars))


def check(model_spec: str, *, dataset: str = "geonames", split: str | None = None, limit: int | None = None,
          backend: str = "llamacpp", adapter: Path | None = None, zero_shot: bool = False,
          seed: int = 0, options: dict | None = None, out: Path | None = None,
          progress_factory=None, temperature: float = 0.0, exemplars: str | None = None,
          shots: int = prompts.N_SHOTS, max_tokens: int = prompts.MAX_TOKENS, chat: bool = False) -> CheckResult:
    """Run the check; `progress_factory(description, total)` gives a context yielding advance().
    `split` defaults to `default_split(dataset)`; a temperature above 0 samples the answers,
    seeded by `seed`. The few-shot prompt draws `shots` exemplars (seeded) from the `exemplars`
    file, or from the data set's own exemplars; `max_tokens` caps each answer. `chat` (or the
    card's `prompt_style = "chat"`) puts them through the model's own chat template instead."""
    if zero_shot and exemplars:
        raise KmmError("--exemplars gives a few-shot prompt; drop --zero-shot")
    if shots < 0 or max_tokens < 1:
        raise KmmError("--shots must be >= 0 and --max-tokens >= 1")
    sampling = Sampling(temperature, seed)
    split = split or default_split(dataset)
    own = read_exemplars(exemplars) if exemplars else None
    model = cards.resolve(model_spec)
    qs = data.load(dataset, seed=seed)
    questions = qs.split(split)[: limit or None]
    if not questions:
        raise KmmError(f"data set '{dataset}' has no questions in split '{split}'")
    if own is not None and {q.question for q in own} & {q.question for q in questions}:
        raise KmmError(f"the exemplars file {exemplars} shares questions with those being checked")
    pool = own if own is not None else exemplars_for(qs, split, seed)
    if chat or model.prompt_style == "chat":
        template = chat_template(model, backend, [] if zero_shot else prompts.draw(pool, shots, seed))
        options = {**(options or {}), "special": True}
    else:
        template = prompts.PromptTemplate() if zero_shot else prompts.few_shot(pool, k=shots, seed=seed)
    res = evaluate(model, questions, template, backend=backend, adapter=adapter, seed=seed,
                   options=options, progress_factory=progress_factory, sampling=sampling, max_tokens=max_tokens)
    res.metrics.update(schema=SCHEMA, dataset=dataset, split=split, template=template.describe(),
                       exemplars=exemplars, exemplars_sha256=sha256_file(data.parse_spec(exemplars)[1]) if exemplars
                       else None)
    if out is not None:
        write_jsonl(Path(out) / "samples.jsonl", res.samples)
        write_json(Path(out) / "metrics.json", res.metrics)
    return res


# --- the CI contract: one JSON object, and a gate on the wrong-answer rate ---



def summary(res: CheckResult, fail_above: float | None = None) -> dict:
    """`kmm check --json`: counts, rates, the model, prompt and settings, and the gate's outcome."""
    m = res.metrics
    keep = ("n", "correct", "wrong", "abstained", "correct_rate", "wrong_rate", "abstained_rate",
            "hallucination_rate", "precision", "exact_match", "exact_match_rate", "model", "model_sha256",
            "adapter", "adapter_sha256", "dataset", "split", "prompt_style", "prompt_sha256", "template",
            "exemplars", "exemplars_sha256", "seed", "sampling", "max_tokens", "backend", "seconds",
            "questions_per_second")
    out = {"schema": SCHEMA, **{k: m[k] for k in keep if k in m}}
    if fail_above is not None:
        out.update(fail_above=fail_above, passed=m["wrong_rate"] <= fail_above)
    return out


def compare(a: CheckResult, b: CheckResult, *, n_boot: int = 2000, seed: int = 0) -> dict:
    """B against A on the same questions: each one's tally, and the paired test on wrong answers
    (McNemar's exact test on the questions exactly one got wrong, a bootstrap 95% interval on the
    difference in wrong-answer rate, B minus A), as `kmm run` compares its two students."""
    from kmismatch_lite import stats

    if [s["id"] for s in a.samples] != [s["id"] for s in b.samples]:
        raise KmmError("the two models did not answer the same questions")
    test = stats.paired_wrong_test([s["verdict"] == scoring.WRONG for s in b.samples],
                                   [s["verdict"] == scoring.WRONG for s in a.samples], n_boot=n_boot, seed=seed)
    return {"schema": COMPARE_SCHEMA, "a": summary(a), "b": summary(b), "n": test.n,
            "wrong_a": test.wrong_b, "wrong_b": test.wrong_a, "b_only_wrong": test.a_only,
            "a_only_wrong": test.b_only, "wrong_rate_difference": test.diff_rate,
            "bootstrap_95ci": [test.ci_low, test.ci_high], "mcnemar_p": test.p_value}


def compare_text(c: dict) -> str:
    """One sentence: B's wrong answers against A's, with the paired test."""
    d, (lo, hi) = c["wrong_rate_difference"], c["bootstrap_95ci"]
    return (f"B gave {c['wrong_b']} wrong answers, A {c['wrong_a']} on the same {c['n']} questions "
            f"({c['b_only_wrong']} wrong only for B, {c['a_only_wrong']} only for A): difference in wrong-answer "
            f"rate {100 * d:+.1f} points (B minus A), 95% bootstrap interval [{100 * lo:+.1f}, {100 * hi:+.1f}], "
            f"McNemar exact p = {c['mcnemar_p']:.3g}.")
