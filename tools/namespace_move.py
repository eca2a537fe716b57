"""Move the project's import packages under one namespace, `retformer` (issue 22), reproducibly.

    python tools/namespace_move.py [--root .] [--architecture-doc] [--check]

The folders stay at the top of the repository (artifacts/, kb_builder/, trainer/, pipelines/): pyproject's
setuptools `package-dir` maps them onto `retformer.artifacts`, `retformer.kb_builder`, ... This script
rewrites every reference to the old top-level module names (imports, `python -m` / torchrun module
paths, console-script targets, monkeypatch and logger names, module paths in docs) and regenerates the
`[tool.setuptools]` table. It is idempotent: a second run changes nothing, so it can be re-run on a newer
main. File paths (`pipelines/cli.py`) are left as they are: the folders do not move.
"""

from __future__ import annotations

import argparse
import io
import re
import shutil
import subprocess
import sys
import tokenize
from pathlib import Path

NAMESPACE = "retformer"
# The top-level folders that become subpackages of NAMESPACE (the folder keeps its name).
MOVED = ("artifacts", "kb_builder", "trainer", "pipelines")
# Text files whose module references are rewritten (by suffix or by name).
SUFFIXES = {".py", ".md", ".toml", ".sh", ".yaml", ".yml", ".cfg", ".ini", ".txt"}
NAMES = {"Makefile", "run"}
# Recorded outputs (bench/results/) keep what they recorded; the script does not rewrite itself.
# tests/test_packaging.py names the old top-level packages on purpose (to check they are gone).
SKIP_PREFIXES = ("bench/results/", "docs/img/", "tools/namespace_move.py", "tests/test_packaging.py")
# The lead rewrites docs/architecture.md (issue 22); --architecture-doc includes it.
ARCHITECTURE_DOC = "docs/architecture.md"
_OLD = "|".join(MOVED)
# `from trainer import x`, `import pipelines.cli`, `from kb_builder.index import y`: a statement, not prose
# (the name is followed by `.`, ` import`, ` as`, `,` or the end of the line).
_IMPORT = re.compile(
    rf"(?<![\w.])(from|import)(\s+)({_OLD})(?=\.\w|\s+import\b|\s+as\b|\s*,|\s*$|\s+#)", re.M
)
# `python -m pipelines.report`, `torchrun ... -m pipelines.cli`: a command, also in prose.
_COMMAND = re.compile(rf"(?<=-m )(?=(?:{_OLD})\.\w)")
# Docstring lines that the command prefix pushes past the line length, rewrapped (old, new).
_REWRAP = (
    (
        '"""The `retformer` command line\'s entry point (`main`, the console script and'
        " `python -m retformer.pipelines.cli`):\n"
        "the app of pipelines/cli_app.py with every command module registered on it, and"
        " how errors end.\n",
        '"""The `retformer` command line\'s entry point (`main`, the console script,'
        " `python -m retformer` and\n"
        "`python -m retformer.pipelines.cli`): the app of pipelines/cli_app.py with"
        " every command module\n"
        "registered on it, and how errors end.\n",
    ),
    (
        "`python -m retformer.pipelines.report RUN_DIR [--png PATH]` rewrites a run's"
        " report (and saves its main figure).\n",
        "`python -m retformer.pipelines.report RUN_DIR [--png PATH]` rewrites a run's"
        " report (and saves its main\n"
        "figure).\n",
    ),
    (
        "ends with the same global batch, in feature mode (through `torchrun ... -m"
        " retformer.pipelines.cli train`) and in\n"
        "fine-tune mode, and a checkpoint",
        "ends with the same global batch, in feature mode (through `torchrun ... -m"
        " retformer.pipelines.cli train`)\n"
        "and in fine-tune mode, and a checkpoint",
    ),
)
# Module names that are quoted bare in package code (logger names to quiet, importlib.resources anchors).
_QUOTED_BARE = (
    ('for noisy in ("kb_builder", "faiss")', 'for noisy in ("retformer.kb_builder", "faiss")'),
    ('resources.files("pipelines")', 'resources.files("retformer.pipelines")'),
)


def submodules(root: Path, package: str) -> set[str]:
    """The names directly under a package folder that are modules or subpackages."""
    folder = root / package
    names = {p.stem for p in folder.glob("*.py") if p.stem != "__init__"}
    names |= {p.name for p in folder.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    return names


def dotted_pattern(root: Path) -> re.Pattern[str]:
    """`trainer.train`, `pipelines.cli:main`, `"kb_builder.index.select"`, f"pipelines.{x}": a moved
    package followed by one of its own modules (or an f-string field), not part of a path
    (`pipelines/cli.py`, `results/trainer.json`) nor already namespaced (`retformer.trainer`)."""
    alternatives = []
    for package in MOVED:
        subs = "|".join(sorted(submodules(root, package), key=lambda s: (-len(s), s)))
        alternatives.append(rf"{package}\.(?:(?:{subs})\b|\{{)")
    return re.compile(rf"(?<![\w./\-])(?={'|'.join(alternatives)})")


def rewrite_text(text: str, dotted: re.Pattern[str]) -> str:
    """Every old top-level module reference in text, prefixed with the namespace."""
    text = _IMPORT.sub(lambda m: f"{m.group(1)}{m.group(2)}{NAMESPACE}.{m.group(3)}", text)
    text = dotted.sub(f"{NAMESPACE}.", text)
    for old, new in _QUOTED_BARE:
        text = text.replace(old, new)
    return text


def rewrite_python(source: str, dotted: re.Pattern[str]) -> str:
    """rewrite_text on the code of a Python file only: import statements and string literals (module
    paths, `python -m` arguments, monkeypatch targets). Comments and docstrings keep their short names
    (`trainer.train.predict`): prefixing them would push prose lines past the line length."""
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    offsets = [0]
    for line in source.splitlines(keepends=True):
        offsets.append(offsets[-1] + len(line))
    edits: list[tuple[int, int, str]] = []
    for tok in tokens:  # comments: only the commands they show
        if tok.type == tokenize.COMMENT and _COMMAND.search(tok.string):
            start = offsets[tok.start[0] - 1] + tok.start[1]
            edits.append((start, start + len(tok.string), _COMMAND.sub(f"{NAMESPACE}.", tok.string)))
    code = [t for t in tokens if t.type not in (tokenize.NL, tokenize.COMMENT)]
    for i, tok in enumerate(code):
        start = offsets[tok.start[0] - 1] + tok.start[1]
        end = offsets[tok.end[0] - 1] + tok.end[1]
        before = code[i - 1].type if i else tokenize.NEWLINE
        after = code[i + 1].type if i + 1 < len(code) else tokenize.ENDMARKER
        at_statement_start = before in (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT)
        if tok.type == tokenize.STRING or tok.type == getattr(tokenize, "FSTRING_MIDDLE", -1):
            if tok.type == tokenize.STRING and at_statement_start and after == tokenize.NEWLINE:
                new = _COMMAND.sub(f"{NAMESPACE}.", tok.string)  # a docstring: only its commands
                if new != tok.string:
                    edits.append((start, end, new))
                continue
            new = rewrite_text(tok.string, dotted)
            if new != tok.string:
                edits.append((start, end, new))
        elif tok.type == tokenize.NAME and tok.string in ("from", "import") and at_statement_start:
            nxt = code[i + 1] if i + 1 < len(code) else None
            if nxt is not None and nxt.type == tokenize.NAME and nxt.string in MOVED:
                at = offsets[nxt.start[0] - 1] + nxt.start[1]
                edits.append((at, at, f"{NAMESPACE}."))
    for start, end, new in sorted(edits, reverse=True):
        source = source[:start] + new + source[end:]
    for old, new in (*_QUOTED_BARE, *_REWRAP):  # several tokens each: matched on the text
        source = source.replace(old, new)
    return source


def tidy(root: Path, changed: list[str]) -> None:
    """Sort the imports and format the changed Python files with the project's ruff (the prefix
    changes the import order and the length of import lines)."""
    ruff = root / ".venv" / "bin" / "ruff"
    if not ruff.exists():
        ruff = Path(shutil.which("ruff") or "ruff")
    files = [name for name in changed if name.endswith(".py")]
    if files:
        subprocess.run([str(ruff), "check", "--select", "I", "--fix", "-q", *files], cwd=root, check=False)
        subprocess.run([str(ruff), "format", "-q", *files], cwd=root, check=True)


def packages(root: Path) -> list[str]:
    """Every import package of the namespace (each folder with an __init__.py), sorted."""
    found = [NAMESPACE]
    for top in (NAMESPACE, *MOVED):
        for init in sorted((root / top).rglob("__init__.py")):
            rel = init.parent.relative_to(root / top)
            if "__pycache__" in rel.parts or not rel.parts and top == NAMESPACE:
                continue
            base = NAMESPACE if top == NAMESPACE else f"{NAMESPACE}.{top}"
            found.append(".".join([base, *rel.parts]))
    return sorted(set(found))


def setuptools_table(root: Path) -> str:
    """pyproject's `[tool.setuptools]` table: the folder of each package and every package by name
    (listed, not found: `find` would install the folders as top-level packages)."""
    dirs = ", ".join([f'"{NAMESPACE}" = "{NAMESPACE}"', *(f'"{NAMESPACE}.{p}" = "{p}"' for p in MOVED)])
    listed = "".join(f'  "{p}",\n' for p in packages(root))
    return (
        "[tool.setuptools]\n"
        f"# One import namespace, `{NAMESPACE}`: the folders stay at the repository's top level and are\n"
        "# mapped onto its subpackages. Every package is listed (tests/test_packaging.py checks the list\n"
        "# against the folders; `python tools/namespace_move.py` regenerates it).\n"
        f"package-dir = {{ {dirs} }}\n"
        f"packages = [\n{listed}]\n"
    )


def rewrite_pyproject(text: str, root: Path) -> str:
    """The module references, the `[tool.setuptools]` table and the package-data key."""
    text = rewrite_text(text, dotted_pattern(root))
    text = re.sub(r"(?ms)^\[tool\.setuptools\]\n.*?(?=^\[)", lambda _: setuptools_table(root) + "\n", text)
    text = re.sub(r"(?m)^pipelines = (\[\"static/)", rf'"{NAMESPACE}.pipelines" = \1', text)
    if "[tool.ruff.lint.isort]" not in text:
        # ruff finds first-party modules by their folders: `retformer/pipelines` is no folder.
        isort = f'[tool.ruff.lint.isort]\nknown-first-party = ["{NAMESPACE}"]\n\n'
        text = re.sub(r"(?m)^(?=\[tool\.pytest\.ini_options\])", lambda _: isort, text, count=1)
    return text


MAIN = f'''"""`python -m {NAMESPACE}`: the command line (as the `{NAMESPACE}` console script)."""

from {NAMESPACE}.pipelines.cli import main

if __name__ == "__main__":
    main()
'''

# Test helpers that turned module names into file paths by their dots: with package-dir the file of
# `retformer.trainer.train` is trainer/train.py, so they ask tests/package_layout.py instead.
# (file, old, new): applied when `old` is there; a file that has neither old nor new is reported.
TEST_PATCHES = (
    (
        "tests/test_use_layer.py",
        "from retformer.trainer.features import RetrievalFeatures\n\n",
        "from retformer.trainer.features import RetrievalFeatures\n"
        "from tests.package_layout import module_file\n\n",
    ),
    (
        "tests/test_use_layer.py",
        '    path = REPO / Path(*module.split("."))\n'
        '    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")\n',
        "    path = module_file(module)\n",
    ),
    (
        "tests/test_use_layer.py",
        "            while parts and not (\n"
        '                (REPO / Path(*parts)).with_suffix(".py").is_file()'
        " or (REPO / Path(*parts)).is_dir()\n"
        "            ):\n",
        '            while parts and module_file(".".join(parts)) is None:\n',
    ),
    (
        "tests/test_architecture.py",
        "import pytest\n\n",
        "import pytest\n\nfrom tests.package_layout import module_of\n\n",
    ),
    (
        "tests/test_architecture.py",
        '    """The dotted module name of a file under root (`pkg/__init__.py` is `pkg`)."""\n',
        '    """The dotted module name of a file under root (`pkg/__init__.py` is `pkg`); the project\'s\n'
        '    own files by pyproject\'s package-dir (`trainer/train.py` is `retformer.trainer.train`)."""\n'
        "    if root == ROOT:\n"
        "        return module_of(path)\n",
    ),
    (
        "tests/test_cli_app.py",
        "(PIPELINES / f\"{module.split('.')[1]}.py\")",
        "(PIPELINES / f\"{module.split('.')[-1]}.py\")",
    ),
)


def apply_test_patches(root: Path) -> list[str]:
    """Apply TEST_PATCHES; the (file, old) pairs found neither applied nor already done."""
    missing = []
    for rel, old, new in TEST_PATCHES:
        path = root / rel
        if not path.is_file():
            missing.append(f"{rel}: file not found")
            continue
        text = path.read_text(encoding="utf-8")
        if new in text:
            continue
        if old in text:
            path.write_text(text.replace(old, new, 1), encoding="utf-8")
        else:
            missing.append(f"{rel}: {old.strip().splitlines()[0]!r}")
    return missing


def tracked_files(root: Path, architecture_doc: bool) -> list[Path]:
    """The tracked (and untracked, not ignored) text files the rewrite covers."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    chosen = []
    for rel in sorted(set(out)):
        path = root / rel
        if rel.startswith(SKIP_PREFIXES) or (rel == ARCHITECTURE_DOC and not architecture_doc):
            continue
        if path.is_file() and (path.suffix in SUFFIXES or path.name in NAMES):
            chosen.append(path)
    return chosen


def leftovers(root: Path, files: list[Path]) -> list[str]:
    """Lines that still name a moved package followed by a dot (`trainer.fit`?) for a human to judge;
    paths and already-namespaced names are not listed."""
    pattern = re.compile(rf"(?<![\w./\-])({_OLD})\.[A-Za-z_{{]")
    found = []
    for path in (p for p in files if p.suffix != ".py"):  # .py: comments and docstrings keep them
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if pattern.search(line):
                found.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    return found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1])
    ap.add_argument("--architecture-doc", action="store_true", help=f"also rewrite {ARCHITECTURE_DOC}")
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 when a file would change")
    args = ap.parse_args(argv)
    root = args.root.resolve()
    dotted = dotted_pattern(root)
    files = tracked_files(root, args.architecture_doc)
    changed: list[str] = []
    for path in files:
        text = path.read_text(encoding="utf-8")
        is_pyproject = path == root / "pyproject.toml"
        if is_pyproject:
            new = rewrite_pyproject(text, root)
        elif path.suffix == ".py":
            new = rewrite_python(text, dotted)
        else:
            new = rewrite_text(text, dotted)
        if new != text:
            changed.append(str(path.relative_to(root)))
            if not args.check:
                path.write_text(new, encoding="utf-8")
    main_py = root / NAMESPACE / "__main__.py"
    if not main_py.is_file() or main_py.read_text(encoding="utf-8") != MAIN:
        changed.append(str(main_py.relative_to(root)))
        if not args.check:
            main_py.write_text(MAIN, encoding="utf-8")
    missing = [] if args.check else apply_test_patches(root)
    if not args.check:
        tidy(root, [*changed, *(rel for rel, _, _ in TEST_PATCHES)])
    print(f"{len(changed)} files {'would change' if args.check else 'changed'}")
    for name in changed:
        print(f"  {name}")
    for line in leftovers(root, files):
        print(f"left for review: {line}")
    for line in missing:
        print(f"TEST PATCH NOT APPLIED (apply by hand): {line}", file=sys.stderr)
    return 1 if (args.check and changed) or missing else 0


if __name__ == "__main__":
    sys.exit(main())
