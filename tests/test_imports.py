"""`import kmismatch_lite` and `kmm --help` stay light: no heavy library is imported."""

import json
import subprocess
import sys

import pytest

HEAVY = ("llama_cpp", "torch", "transformers", "mlx", "mlx_lm", "peft", "unsloth", "datasets")

PROBE = """
import json, sys
{body}
heavy = {heavy!r}
print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in heavy)))
"""


def _heavy_loaded(body: str) -> list[str]:
    code = PROBE.format(body=body, heavy=HEAVY)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_import_package_and_cli_is_light():
    assert _heavy_loaded("import kmismatch_lite, kmismatch_lite.cli") == []


@pytest.mark.parametrize("args", [["--help"], ["check", "--help"], ["models"]])
def test_kmm_commands_are_light(args):
    body = (
        "from kmismatch_lite.cli import cli\n"
        "try:\n"
        f"    cli.main({args!r}, standalone_mode=False)\n"
        "except SystemExit:\n"
        "    pass\n"
    )
    assert _heavy_loaded(body) == []


def test_kmm_help_lists_the_commands():
    res = subprocess.run([sys.executable, "-m", "kmismatch_lite", "--help"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0 and "check" in res.stdout and "models" in res.stdout


# --- the import graph points one way ------------------------------------------------------------

import ast  # noqa: E402
from pathlib import Path  # noqa: E402

PACKAGE = Path(__file__).resolve().parent.parent / "kmismatch_lite"
# The verbs and the shell that drive the backends; a backend never imports them.
DRIVERS = {"kmismatch_lite.cli", "kmismatch_lite.run", "kmismatch_lite.check", "kmismatch_lite.finetune",
           "kmismatch_lite.report", "kmismatch_lite.pool", "kmismatch_lite.plan", "kmismatch_lite.recipes"}


def _graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports, at the top or inside a function."""
    mods = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        mods[name] = path
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            edges[m].update(t for t in targets if t in mods and t != m)
    return edges


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        path.append(v)
        for w in sorted(edges[v]):
            if state.get(w) == 1:
                return path[path.index(w):] + [w]
            if w not in state and (found := visit(w)):
                return found
        state[v] = 2
        path.pop()
        return None

    for v in sorted(edges):
        if v not in state and (found := visit(v)):
            return found
    return None


def test_no_import_circles():
    assert _cycle(_graph()) is None


def test_the_cycle_finder_finds_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


def test_backends_never_import_what_drives_them():
    edges = _graph()
    wrong = {m: sorted(edges[m] & DRIVERS) for m in edges if m.startswith("kmismatch_lite.backends")}
    assert {m: w for m, w in wrong.items() if w} == {}


# Top to bottom; a module imports only from its own layer or the layers below it.
LAYERS = {
    "shell": ("cli", "__main__", "ui"),
    "experiment": ("run", "dry_run", "parallel", "stage_run", "plan", "pool", "report", "report_designs", "recipes",
                   "handin"),
    "designs": ("designs", "settings"),
    "verbs": ("check", "finetune"),
    "backends": ("backends",),
    "formats": ("formats", "lora_data"),
    "questions": ("qa",),
    "leaves": ("cards", "errors", "io", "toml_strict", "stats", "fingerprint"),
}
# Package roots that hold no code of their own: `from kmismatch_lite import x` names them.
EMPTY_ROOTS = {"kmismatch_lite", "kmismatch_lite.qa", "kmismatch_lite.formats"}


def _layer(module: str) -> int | None:
    name = module.removeprefix("kmismatch_lite.")
    for i, prefixes in enumerate(LAYERS.values()):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return i
    return None


def _upward(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted((m, t) for m, targets in edges.items() if m not in EMPTY_ROOTS for t in targets
                  if t not in EMPTY_ROOTS and _layer(t) < _layer(m))


def test_every_module_has_a_layer():
    assert [m for m in _graph() if m not in EMPTY_ROOTS and _layer(m) is None] == []


def test_the_layers_point_one_way():
    assert _upward(_graph()) == []


def test_an_upward_import_is_found():
    edges = {"kmismatch_lite.qa.scoring": {"kmismatch_lite.run"}, "kmismatch_lite.run": {"kmismatch_lite.qa.scoring"}}
    assert _upward(edges) == [("kmismatch_lite.qa.scoring", "kmismatch_lite.run")]
