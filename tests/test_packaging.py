"""One import namespace (issue 22): `pip install` puts only `retformer` into site-packages. The folders
artifacts/, kb_builder/, trainer/ and pipelines/ stay at the repository's top level and pyproject's
`package-dir` maps them onto `retformer.artifacts`, ... (tests/package_layout.py reads the mapping)."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib

from tests.package_layout import REPO, module_file, module_of, package_dirs
from tests.test_cli_app import COMMANDS

# The folders that were top-level packages before the namespace: only `retformer.<name>` may be imported.
MOVED = ("artifacts", "kb_builder", "trainer", "pipelines")


def _listed_packages() -> list[str]:
    with open(REPO / "pyproject.toml", "rb") as fh:
        return tomllib.load(fh)["tool"]["setuptools"]["packages"]


def _package_folders() -> list[str]:
    """Every folder with an __init__.py under a mapped folder, by its package name."""
    found = set()
    for folder in set(package_dirs().values()):
        for init in (REPO / folder).rglob("__init__.py"):
            if "__pycache__" not in init.parts:
                found.add(module_of(init))
    return sorted(found)


def test_packages_list_is_every_package_folder() -> None:
    """pyproject's explicit `packages` list names exactly the folders that hold an __init__.py (a new
    subpackage left out of the list would be missing from the wheel), and every name is `retformer` or
    below it: nothing else is installed at the top level."""
    listed = _listed_packages()
    assert sorted(listed) == _package_folders()
    assert all(name == "retformer" or name.startswith("retformer.") for name in listed), listed
    assert set(package_dirs()) == {"retformer", *(f"retformer.{m}" for m in MOVED)}


def test_module_file_and_module_of_follow_package_dir() -> None:
    """The test helpers map a module name to its file through package-dir and back: the import-graph
    tests (test_architecture.py, test_use_layer.py) read the right files."""
    assert module_file("retformer.trainer.train") == REPO / "trainer" / "train.py"
    assert module_file("retformer.kb_builder.index") == REPO / "kb_builder" / "index" / "__init__.py"
    assert module_file("retformer.api") == REPO / "retformer" / "api.py"
    assert module_file("retformer.trainer.train.fit") is None  # an attribute, not a module
    assert module_file("trainer.train") is None  # the old top-level name is no module any more
    assert module_of(REPO / "pipelines" / "use" / "__init__.py") == "retformer.pipelines.use"
    assert module_of(REPO / "retformer" / "__init__.py") == "retformer"


def test_no_bare_top_level_imports() -> None:
    """No package, test or bench file imports `trainer`, `pipelines`, `kb_builder` or `artifacts` as a
    top-level package (also inside functions): only `retformer.<name>`, the one installed name."""
    files = [p for top in ("retformer", *MOVED, "tests", "bench") for p in (REPO / top).rglob("*.py")]
    found = []
    for path in files:
        if "__pycache__" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            found += [
                f"{path.relative_to(REPO)}:{node.lineno} {n}" for n in names if n.split(".")[0] in MOVED
            ]
    assert not found, "\n".join(found)


def test_python_dash_m_retformer_is_the_command_line() -> None:
    """`python -m retformer` runs the same command line as the console script and as
    `python -m retformer.pipelines.cli` (which keeps working)."""
    runs = [
        subprocess.run(
            [sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120, cwd=REPO
        )
        for module in ("retformer", "retformer.pipelines.cli")
    ]
    assert [r.returncode for r in runs] == [0, 0], [r.stderr[-2000:] for r in runs]
    for command in COMMANDS:
        assert f" {command} " in runs[0].stdout and f" {command} " in runs[1].stdout, command


def test_the_command_line_imports_no_torch_before_a_command_needs_it() -> None:
    """Proves `retformer`'s entry point stays light under the one namespace: importing
    retformer.pipelines.cli (which runs retformer/__init__.py first) loads neither torch nor the
    notebook API, while `from retformer import load_run` still works (imported on first use)."""
    code = (
        "import sys, retformer.pipelines.cli\n"
        "print('torch' in sys.modules, 'retformer.api' in sys.modules)\n"
        "from retformer import load_run\n"
        "print(load_run.__module__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.split() == ["False", "False", "retformer.api"], out.stdout + out.stderr
