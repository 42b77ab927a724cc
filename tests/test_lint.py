"""The written-down structure holds: import rules (import-linter contracts in pyproject.toml: the model is pure,
kernels are leaves, evaluation never imports the trainer, nothing imports the CLI, packages layered by role), ruff's
lint, and the size limits (files <= ~500 lines, functions <= ~80 unless their docstring gives the reason)."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MAX_FILE_LINES, MAX_FUNCTION_LINES = 500, 80


def run(tool: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / tool), *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_import_rules_hold():
    r = run("lint-imports", "--no-cache")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "broken" not in r.stdout.lower().replace("0 broken", "")


def test_ruff_is_clean():
    r = run("ruff", "check", "--no-cache", "dsv4", "tests", "bench")
    assert r.returncode == 0, r.stdout + r.stderr


def python_files() -> list[Path]:
    return sorted(p for d in ("dsv4", "bench") for p in (ROOT / d).rglob("*.py"))


def test_no_module_over_the_size_limit():
    long = {str(p.relative_to(ROOT)): n for p in python_files() if (n := len(p.read_text().splitlines()))
            > MAX_FILE_LINES}
    assert not long, f"modules over {MAX_FILE_LINES} lines (split them by concept): {long}"


def test_no_long_function_without_a_reason():
    """A function over the limit must say why in its docstring ("long because ...")."""
    long = []
    for path in python_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                doc = ast.get_docstring(node) or ""
                if n > MAX_FUNCTION_LINES and "long because" not in doc.lower():
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "functions over the limit without a reason:\n" + "\n".join(long)
