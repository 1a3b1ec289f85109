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
    ("seeds=0,x", "setting 'seeds': bad value"),
    ("sweep=1", "name the setting to vary"),
    ("sweep.data.size=1,2", "unknown setting 'data.size'"),
    ("sweep.data.test=1,x", "setting 'sweep.data.test': bad value"),
])
def test_bad_overrides(tmp_path, bad, msg):
    with pytest.raises(KmmError, match=msg):
        recipes.load(write(tmp_path, BASE), [bad])


def test_seeds_in_the_recipe_and_on_the_command_line(tmp_path):
    path = write(tmp_path, "seeds = [0, 1, 2]\n" + BASE)
    r = recipes.load(path)
    assert r["seeds"] == [0, 1, 2] and "seed" not in r
    assert recipes.load(path, ["seeds=4,5"])["seeds"] == [4, 5]
    # one seed on the command line turns a many-seed recipe back into a single-seed run
    r = recipes.load(path, ["seed=7"])
    assert r["seed"] == 7 and "seeds" not in r
    r = recipes.load(write(tmp_path, "seed = 3\n" + BASE), ["seeds=0,1"])
    assert r["seeds"] == [0, 1] and "seed" not in r
    # a list may be written as in the recipe file
    assert recipes.load(path, ["seeds=[4, 5]"])["seeds"] == [4, 5]
    assert recipes.load(path, ["design.doses=[0, 0.5, 1]"])["design"]["doses"] == [0.0, 0.5, 1.0]
    assert recipes.load(path, ["sweep.finetune.lora.epochs=[1,2]"])["sweep"] == {"finetune.lora.epochs": [1, 2]}


def test_a_single_seed_recipe_resolves_as_before(tmp_path):
    r = recipes.load(write(tmp_path, "seed = 3\n" + BASE))
    assert r["seed"] == 3 and "seeds" not in r and "sweep" not in r


def test_sweep_in_the_recipe_and_on_the_command_line(tmp_path):
    path = write(tmp_path, BASE + '[sweep]\n"finetune.lora.epochs" = [1, 2, 4]\n')
    assert recipes.load(path)["sweep"] == {"finetune.lora.epochs": [1, 2, 4]}
    r = recipes.load(path, ["sweep.finetune.lora.learning_rate=1e-4,5e-4", "sweep.finetune.lora.epochs=3"])
    assert r["sweep"] == {"finetune.lora.epochs": [3], "finetune.lora.learning_rate": [1e-4, 5e-4]}
    # a plain setting on the command line replaces the recipe's grid axis on that key
    r = recipes.load(path, ["finetune.lora.epochs=2"])
    assert r["sweep"] == {} and r["finetune"]["lora"]["epochs"] == 2


@pytest.mark.parametrize("text, msg", [
    ("seed = 1\nseeds = [2]\n", "set 'seed' or 'seeds', not both"),
    ("seeds = []\n", "'seeds' must be a non-empty list"),
    ('seeds = [0, "a"]\n', "'seeds' must be a non-empty list of integers"),
    ("seeds = [1, 1]\n", "lists a seed twice"),
    ("seeds = 3\n", "'seeds' must be list"),
])
def test_bad_seeds(tmp_path, text, msg):
    with pytest.raises(KmmError, match=msg):
        recipes.load(write(tmp_path, text + BASE))


@pytest.mark.parametrize("axis, msg", [
    ('"finetune.lora.epoch" = [1]', r"sweep: unknown setting 'finetune\.lora\.epoch'"),
    ('"finetune.lora" = [1]', "is a table"),
    ('"seed" = [1, 2]', "cannot be swept .list seeds in 'seeds'"),
    ('"name" = ["a", "b"]', "cannot be swept"),
    ('"generate.options" = [{}]', "backend options cannot be swept"),
    ('"finetune.lora.epochs" = 2', "must be a non-empty list of values"),
    ('"finetune.lora.epochs" = []', "must be a non-empty list of values"),
    ('"finetune.lora.epochs" = [1, 1]', "lists a value twice"),
    ('"finetune.lora.epochs" = [1, "two"]', r"sweep: 'finetune\.lora\.epochs' must be int, got 'two'"),
    ('"finetune.lora.epochs" = [1, 0]', r"sweep finetune\.lora\.epochs=0: fine-tune setting 'epochs' is out of range"),
    ('"models.teacher" = ["gemma-3-270m", "nope"]', "sweep models.teacher='nope': models.teacher: unknown model 'nope'"),
    ('"finetune.backend" = ["torch", "cuda"]', "unknown backend 'cuda'"),
])
def test_bad_sweeps_are_one_line_errors(tmp_path, axis, msg):
    path = write(tmp_path, BASE + f"[sweep]\n{axis}\n")
    with pytest.raises(KmmError, match=msg) as info:
        recipes.load(path)
    assert "\n" not in str(info.value) and "r.toml" in str(info.value)



@pytest.mark.parametrize("setting, msg", [
    ("seeds=0,x", "setting 'seeds': bad value"),
    ("sweep.finetune.lora.epochs=1,0", "sweep finetune.lora.epochs=0: fine-tune setting 'epochs' is out of range"),
])
def test_bad_seeds_or_sweep_on_the_command_line_is_one_line(tmp_path, setting, msg):
    from conftest import run_kmm

    out = tmp_path / "run"
    proc = run_kmm("run", "smoke", "--out", str(out), "-s", setting, cwd=tmp_path)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and msg in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("table, msg", [
    ('[evaluate.options]\nparalel = 2\n', "evaluate.options: unknown option 'paralel' for the llamacpp backend"),
    ('[generate.options]\nparallel = "8"\n', "generate.options: bad value for option 'parallel'"),
    ('[generate.options]\nexact = 1\n', "generate.options: bad value for option 'exact'"),
    ('[evaluate]\nbackend = "mlx"\n[evaluate.options]\nexact = true\n', "unknown option 'exact' for the mlx backend"),
])
def test_backend_options_are_checked_when_the_recipe_loads(tmp_path, table, msg):
    with pytest.raises(KmmError, match=msg.replace("(", r"\(")):
        recipes.load(write(tmp_path, BASE + table))


def test_declared_backend_options_load(tmp_path):
    r = recipes.load(write(tmp_path, BASE + '[evaluate.options]\nparallel = 1\nexact = true\nlora_scale = 1\n'))
    assert r["evaluate"]["options"] == {"parallel": 1, "exact": True, "lora_scale": 1}
    served = BASE.replace('"gemma-3-270m"', '"openai:http://127.0.0.1:9/v1#m"')
    r = recipes.load(write(tmp_path, served + '[generate.options]\nconcurrency = 4\nparallel = 2\n'))
    assert r["generate"]["options"] == {"concurrency": 4, "parallel": 2}


def test_the_fine_tune_base_weights_are_a_setting_checked_at_load(tmp_path):
    r = recipes.load(write(tmp_path, BASE), ["finetune.backend=unsloth", "finetune.lora.base_weights=hub"])
    assert r["finetune"]["lora"]["base_weights"] == "hub"
    with pytest.raises(KmmError, match='base_weights = "hub" needs the unsloth or mlx backend'):
        recipes.load(write(tmp_path, BASE), ["finetune.lora.base_weights=hub"])
    with pytest.raises(KmmError, match="base_weights"):
        recipes.load(write(tmp_path, BASE), ["finetune.lora.base_weights=s3"])


def test_the_quickstart_and_classroom_run_the_settings_the_readme_states():
    # README: SmolLM2-135M student, Gemma 3 270M teacher, 400 GeoNames test questions, a LoRA with a
    # dev split and a linear decay from 5e-4 for at most 4 epochs; the classroom is the quickstart over
    # seeds 0-4.
    q = recipes.load("quickstart")
    assert q["models"] == {"student": "smollm2-135m-instruct", "teacher": "gemma-3-270m"}
    assert (q["data"]["dataset"], q["data"]["test"], q["data"]["shots"]) == ("geonames", 400, 3)
    lora = q["finetune"]["lora"]
    assert lora["dev_fraction"] > 0 and lora["lr_schedule"] == "linear"
    assert lora["learning_rate"] == 5e-4 and lora["epochs"] == 4 and q["seed"] == 0
    c = recipes.load("classroom")
    assert c["seeds"] == [0, 1, 2, 3, 4]
    same = {k: v for k, v in q.items() if k not in ("name", "description", "seed", "recipe_file")}
    assert same == {k: v for k, v in c.items() if k not in ("name", "description", "seeds", "recipe_file")}
