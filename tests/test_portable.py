"""The run machinery is portable: no POSIX-only module or call, and every text file is read and
written as UTF-8 whatever the system's locale (Windows' default is a code page)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "kmismatch_lite"
POSIX_ONLY_MODULES = {"fcntl", "termios", "pwd", "grp", "resource", "pty", "tty"}
POSIX_ONLY_OS = {"pread", "pwrite", "fork", "getuid", "geteuid", "fchmod", "fchown", "setsid", "killpg"}
TEXT_CALLS = {"read_text", "write_text"}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path, ast.parse(path.read_text(encoding="utf-8"), str(path))


def test_no_posix_only_modules_or_os_calls():
    found = []
    for path, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found += [(path.name, a.name) for a in node.names if a.name in POSIX_ONLY_MODULES]
            elif isinstance(node, ast.ImportFrom) and node.module in POSIX_ONLY_MODULES:
                found.append((path.name, node.module))
            elif (isinstance(node, ast.Attribute) and node.attr in POSIX_ONLY_OS
                  and isinstance(node.value, ast.Name) and node.value.id == "os"):
                found.append((path.name, f"os.{node.attr}"))
    assert found == []


def test_text_files_name_their_encoding():
    missing = []
    for path, tree in _modules():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            keywords = {k.arg for k in node.keywords}
            if isinstance(f, ast.Attribute) and f.attr in TEXT_CALLS and "encoding" not in keywords:
                missing.append((path.name, node.lineno, f.attr))
            if isinstance(f, ast.Name) and f.id == "open" and "encoding" not in keywords:
                mode = node.args[1].value if len(node.args) > 1 and isinstance(node.args[1], ast.Constant) else "r"
                if "b" not in mode and not (node.args and ast.unparse(node.args[0]) == "os.devnull"):
                    missing.append((path.name, node.lineno, "open"))
    assert missing == []
