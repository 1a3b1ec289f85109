"""Question sets: the built-in geonames generator, subject-disjoint splits, local files."""

import json
import math
from collections import Counter

import pytest

from kmismatch_lite.qa import data, geonames
from kmismatch_lite.qa.data import Question, split_by_subject
from kmismatch_lite.errors import KmmError


@pytest.fixture(scope="module")
def built():
    return geonames.build(n_cities=400, seed=0)


def test_geonames_relations_and_schema(built):
    rel = Counter(q.relation for q in built)
    assert set(rel) == set(geonames.RELATIONS)
    assert all(n >= 100 for n in rel.values()), rel
    assert rel["country_of_city"] == 400
    ids = [q.id for q in built]
    assert len(ids) == len(set(ids))
    for q in built:
        assert q.question.endswith("?") and q.answers and all(a.strip() for a in q.answers)
        assert q.subject and q.popularity is not None


def test_geonames_known_facts(built):
    by_id = {q.id: q for q in built}
    assert by_id["capital:FR"].answers[0] == "Paris"
    assert by_id["capital:JP"].answers[0] == "Tokyo"
    assert by_id["continent:BR"].answers == ["South America"]
    assert "EUR" in by_id["currency:DE"].answers
    assert by_id["capital:FR"].question == "What is the capital of France?"


def test_geonames_has_aliases(built):
    # country aliases for city questions, spelling variants for capitals
    us_city = next(q for q in built if q.relation == "country_of_city" and q.answers[0] == "United States")
    assert "USA" in us_city.answers
    assert sum(len(q.answers) > 1 for q in built if q.relation == "capital") > 50


def test_geonames_popularity_spread(built):
    pops = [q.popularity for q in built if q.relation == "country_of_city"]
    decades = Counter(int(math.log10(p)) for p in pops)
    # famous (millions) and obscure (tens of thousands) cities both well represented
    assert sum(n for d, n in decades.items() if d >= 6) >= 40
    assert sum(n for d, n in decades.items() if d <= 4) >= 100
    assert max(pops) > 5_000_000 and min(pops) < 30_000


def test_geonames_deterministic_and_seeded():
    a = [q.id for q in geonames.build(n_cities=200, seed=1)]
    b = [q.id for q in geonames.build(n_cities=200, seed=1)]
    c = [q.id for q in geonames.build(n_cities=200, seed=2)]
    assert a == b
    assert a != c


def test_even_quota_fills_from_small_bins():
    assert geonames._even_quota({1: 2, 2: 100, 3: 5}, 50) == {1: 2, 2: 43, 3: 5}
    assert geonames._even_quota({1: 2, 2: 3}, 50) == {1: 2, 2: 3}
    assert sum(geonames._even_quota({k: 1000 for k in range(7)}, 800).values()) == 800


def test_place_aliases_skip_codes_and_other_scripts():
    out = geonames.place_aliases("Paris", ["PAR", "Parigi", "Pariz", "Париж", "Parisi", "Lutetia"])
    assert out[0] == "Paris"
    assert "PAR" not in out and "Париж" not in out and "Lutetia" not in out


def _subjects(qs):
    return {q.subject or q.id for q in qs}


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_geonames_splits_share_no_subject(seed):
    qs = data.load("geonames:cities=300", seed=seed)
    tr, te, ex = _subjects(qs.train), _subjects(qs.test), _subjects(qs.exemplars)
    assert not (tr & te) and not (tr & ex) and not (te & ex)
    assert len(qs.test) >= 300 and len(qs.exemplars) >= 16
    # every question lands in exactly one split
    all_ids = [q.id for s in data.SPLITS for q in qs.split(s)]
    assert len(all_ids) == len(set(all_ids)) == len(geonames.build(300, seed))


def test_split_deterministic_per_seed_and_seeds_differ():
    qs = [Question(f"q{i}", f"Q{i}?", ["a"], subject=f"s{i // 3}") for i in range(300)]
    a = split_by_subject(qs, seed=3)
    b = split_by_subject(qs, seed=3)
    c = split_by_subject(qs, seed=4)
    ids = lambda split: [q.id for q in split]  # noqa: E731
    assert [ids(s) for s in a] == [ids(s) for s in b]
    assert ids(a[1]) != ids(c[1])
    for x, y in [(a[0], a[1]), (a[0], a[2]), (a[1], a[2])]:
        assert not (_subjects(x) & _subjects(y))


def test_split_without_subject_uses_id():
    qs = [Question(f"q{i}", f"Q{i}?", ["a"]) for i in range(100)]
    train, test, ex = split_by_subject(qs, seed=0, test_frac=0.5, n_exemplars=10)
    assert (len(train), len(test), len(ex)) == (45, 45, 10)


def test_unknown_split_and_dataset():
    qs = data.load("geonames:cities=50")
    with pytest.raises(KmmError, match="unknown split 'dev'"):
        qs.split("dev")
    with pytest.raises(KmmError, match="unknown data set 'nope'"):
        data.load("nope")
    with pytest.raises(KmmError, match="bad option 'towns=3'"):
        data.load("geonames:towns=3")
    with pytest.raises(KmmError, match="bad value for 'cities'"):
        data.load("geonames:cities=many")


# --- local files ------------------------------------------------------------------------------

ROWS = [
    {"id": "a", "question": "What is the capital of France?", "answers": ["Paris"]},
    {"id": "b", "question": "Who wrote Hamlet?", "answers": "William Shakespeare"},
    {"question": "2+2?", "answers": ["4", "four"], "relation": "math", "subject": "arith", "popularity": 7},
]


def _check_rows(questions):
    assert [q.answers for q in questions] == [["Paris"], ["William Shakespeare"], ["4", "four"]]
    assert questions[0].id == "a"
    assert questions[2].relation == "math" and questions[2].popularity == 7


def test_jsonl(tmp_path):
    p = tmp_path / "q.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n")
    qs = data.load_file(p, "jsonl")
    _check_rows(qs)
    assert qs[2].id == "q:3"            # no id: file stem and line number
    assert data.load(f"jsonl:{p}").counts()["exemplars"] > 0
    assert len(data.load(str(p)).train + data.load(str(p)).test + data.load(str(p)).exemplars) == 3


def test_csv(tmp_path):
    p = tmp_path / "q.csv"
    p.write_text(
        "id,question,answers,relation,subject,popularity\n"
        "a,What is the capital of France?,Paris,,,\n"
        'b,Who wrote Hamlet?,"[""William Shakespeare""]",,,\n'
        "c,2+2?,4|four,math,arith,7\n", encoding="utf-8")
    _check_rows(data.load_file(p, "csv"))


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    p = tmp_path / "q.parquet"
    pq.write_table(pa.Table.from_pylist([
        {"id": "a", "question": "What is the capital of France?", "answers": ["Paris"]},
        {"id": "b", "question": "Who wrote Hamlet?", "answers": ["William Shakespeare"]},
        {"id": "c", "question": "2+2?", "answers": ["4", "four"]},
    ]), p)
    qs = data.load_file(p, "parquet")
    assert [q.answers for q in qs] == [["Paris"], ["William Shakespeare"], ["4", "four"]]
    one = tmp_path / "one.parquet"
    pq.write_table(pa.Table.from_pylist([{"question": "Q?", "answers": "A"}]), one)
    assert data.load_file(one, "parquet")[0].answers == ["A"]


def test_malformed_jsonl_rows_named_by_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(
        json.dumps(ROWS[0]) + "\n"          # 1 ok
        + "{not json\n"                     # 2 invalid JSON
        + "\n"                              # 3 blank: skipped, still counted
        + json.dumps({"question": "Q?"}) + "\n"                      # 4 no answers
        + json.dumps({"question": "", "answers": ["x"]}) + "\n"      # 5 empty question
        + json.dumps({"question": "Q?", "answers": []}) + "\n"       # 6 empty list
        + json.dumps({"question": "Q?", "answers": [1]}) + "\n"      # 7 not strings
        + json.dumps(["a", "list"]) + "\n"                           # 8 not an object
        + json.dumps({"question": "Q?", "answers": "x", "popularity": "lots"}) + "\n"  # 9
    )
    with pytest.raises(KmmError) as e:
        data.load_file(p, "jsonl")
    msg = str(e.value)
    assert "\n" not in msg and str(p) in msg
    for line in (2, 4, 5, 6, 7):
        assert f"line {line} " in msg
    assert "line 1 " not in msg and "line 3 " not in msg
    assert "and 2 more" in msg          # lines 8 and 9, beyond the first five


def test_malformed_csv_rows_named_by_line(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("question,answers\nQ1?,A1\n,A2\nQ3?,\n", encoding="utf-8")
    with pytest.raises(KmmError) as e:
        data.load_file(p, "csv")
    # line numbers are file lines: the header is line 1
    assert "line 3 " in str(e.value) and "line 4 " in str(e.value) and "line 2 " not in str(e.value)


def test_csv_without_columns(tmp_path):
    p = tmp_path / "cols.csv"
    p.write_text("q,a\nQ?,A\n")
    with pytest.raises(KmmError, match="line 2 .*question"):
        data.load_file(p, "csv")


@pytest.mark.parametrize("kind, content", [("jsonl", ""), ("jsonl", "\n\n"), ("csv", ""),
                                           ("csv", "question,answers\n")])
def test_empty_file(tmp_path, kind, content):
    p = tmp_path / f"empty.{kind}"
    p.write_text(content)
    with pytest.raises(KmmError, match="is empty"):
        data.load(f"{kind}:{p}")


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(KmmError, match="data file not found"):
        data.load(f"jsonl:{tmp_path / 'nope.jsonl'}")
    with pytest.raises(KmmError, match="needs a path"):
        data.load("csv:")
    bad = tmp_path / "bin.jsonl"
    bad.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(KmmError, match="not a UTF-8 text file"):
        data.load_file(bad, "jsonl")
    pytest.importorskip("pyarrow")
    notpq = tmp_path / "x.parquet"
    notpq.write_text("hello")
    with pytest.raises(KmmError, match="not a readable Parquet file"):
        data.load_file(notpq, "parquet")


def test_duplicate_ids_reported(tmp_path):
    p = tmp_path / "dup.jsonl"
    p.write_text("\n".join(json.dumps({"id": "x", "question": f"Q{i}?", "answers": "A"}) for i in range(2)))
    with pytest.raises(KmmError, match="line 2 .*duplicate id 'x'"):
        data.load_file(p, "jsonl")


def test_id_zero_is_kept(tmp_path):
    p = tmp_path / "z.jsonl"
    p.write_text(json.dumps({"id": 0, "question": "Q?", "answers": "A"}) + "\n")
    assert data.load_file(p, "jsonl")[0].id == "0"


def test_hub_sets_fail_offline_with_one_line():
    pytest.importorskip("datasets")
    with pytest.raises(KmmError) as e:
        data.load("triviaqa:test=5")
    assert "needs internet" in str(e.value) and "\n" not in str(e.value)
