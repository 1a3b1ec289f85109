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
