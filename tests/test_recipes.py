"""Every recipe in recipes/ validates against the code without loading a model or data set."""

from pathlib import Path

import pytest

from kmismatch_lite import cards, recipes
from kmismatch_lite.errors import KmmError

RECIPES = sorted(recipes.RECIPES_DIR.glob("*.toml"))


def test_recipes_exist():
    names = {p.stem for p in RECIPES}
    assert {"quickstart", "smoke", "paper-llama2"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_validates(path: Path):
    r = recipes.load(str(path))
    for role in ("student", "teacher"):
        assert r["models"][role] in cards.cards()
    # the header comment says how to run it
    first = path.read_text().splitlines()[0]
    assert first.startswith("#")
    assert "kmm run" in path.read_text().split("\nname")[0]


def write(tmp_path, text):
    p = tmp_path / "r.toml"
    p.write_text(text)
    return str(p)


BASE = '''name = "t"
[models]
student = "smollm2-135m-instruct"
teacher = "gemma-3-270m"
'''


def test_unknown_key_names_key_and_file(tmp_path):
    path = write(tmp_path, BASE + "[data]\nsize = 3\n")
    with pytest.raises(KmmError, match=r"r\.toml.*unknown key 'data\.size'"):
        recipes.load(path)


def test_unknown_top_level_key(tmp_path):
    with pytest.raises(KmmError, match="unknown key 'colour'"):
        recipes.load(write(tmp_path, 'colour = "red"\n' + BASE))


def test_wrong_type(tmp_path):
    with pytest.raises(KmmError, match="'data.test' must be int"):
        recipes.load(write(tmp_path, BASE + '[data]\ntest = "many"\n'))


def test_unknown_model_and_backend(tmp_path):
    with pytest.raises(KmmError, match="unknown model 'nope'"):
        recipes.load(write(tmp_path, BASE.replace("gemma-3-270m", "nope")))
    with pytest.raises(KmmError, match="unknown backend 'cuda'"):
        recipes.load(write(tmp_path, BASE + '[finetune]\nbackend = "cuda"\n'))


def test_lora_settings_are_checked_by_the_finetune_code(tmp_path):
    with pytest.raises(KmmError, match="fine-tune setting 'rank' is out of range"):
        recipes.load(write(tmp_path, BASE + "[finetune.lora]\nrank = 0\n"))


def test_unknown_recipe_name():
    with pytest.raises(KmmError, match="unknown recipe 'nope'"):
        recipes.find("nope")


def test_overrides_cli_over_recipe_over_defaults(tmp_path):
    path = write(tmp_path, BASE + "[data]\ntest = 50\n")
    r = recipes.load(path, ["data.test=7", "finetune.lora.epochs=3", "seed=4"])
    assert r["data"]["test"] == 7
    assert r["finetune"]["lora"]["epochs"] == 3
    assert r["seed"] == 4
    assert r["data"]["shots"] == recipes.DEFAULTS["data"]["shots"]


@pytest.mark.parametrize("bad, msg", [
    ("data.size=3", "unknown setting 'data.size'"),
    ("data.test=lots", "setting 'data.test'"),
    ("data", "bad setting"),
    ("data=3", "is a table"),
])
def test_bad_overrides(tmp_path, bad, msg):
    with pytest.raises(KmmError, match=msg):
        recipes.load(write(tmp_path, BASE), [bad])
