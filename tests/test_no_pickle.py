"""Weights are never unpickled: no module imports pickle (or a pickle-based loader) or calls
torch.load, and every transformers model load reads a GGUF or safetensors, never a .bin."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "kmismatch_lite"
SOURCES = sorted(PACKAGE.rglob("*.py"))
PICKLERS = {"pickle", "cPickle", "dill", "joblib", "cloudpickle", "_pickle"}


def _tree(path: Path) -> ast.AST:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_pickle_import_or_torch_load(path):
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import):
            assert not {a.name.split(".")[0] for a in node.names} & PICKLERS, (path, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            assert (node.module or "").split(".")[0] not in PICKLERS, (path, node.lineno)
        elif isinstance(node, ast.Attribute) and node.attr == "load" and isinstance(node.value, ast.Name):
            assert node.value.id != "torch", f"{path}:{node.lineno}: torch.load unpickles"


def test_model_loads_read_gguf_or_safetensors():
    calls = []
    for path in SOURCES:
        for node in ast.walk(_tree(path)):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "from_pretrained" and isinstance(node.func.value, ast.Name)
                    and node.func.value.id.startswith("AutoModel")):
                kw = {k.arg: k.value for k in node.keywords}
                safe = "gguf_file" in kw or (isinstance(kw.get("use_safetensors"), ast.Constant)
                                             and kw["use_safetensors"].value is True)
                calls.append((f"{path.name}:{node.lineno}", safe))
    assert calls, "no transformers model load found: the check would pass vacuously"
    assert all(safe for _, safe in calls), calls
