"""The house rules of issue 22, read from the source: no import circles, no long files, no repeated
blocks, no untyped config parameters below the manifest loaders.

Each rule is one test. A rule the code does not meet yet is marked `xfail(strict=True)`: the suite stays
green while others fix it, and the marker must go once it passes (a strict xfail that passes fails).
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path

from tests.package_layout import module_of

ROOT = Path(__file__).resolve().parent.parent
# The project's import packages. A later `retformer.` namespace may nest the others: module names are
# read relative to ROOT, so `retformer/trainer/train.py` is `retformer.trainer.train` either way.
PACKAGES = ("artifacts", "kb_builder", "trainer", "pipelines", "retformer")
MAX_LINES = 450
MIN_BLOCK = 6
# Parameter names that carry a config: a name counts when one of its `_`-separated words is here.
CONFIG_WORDS = frozenset(
    {
        "config",
        "cfg",
        "conf",
        "manifest",
        "spec",
        "experiment",
        "section",
        "options",
        "opts",
        "kb",
        "dataset",
        "settings",
        "recipe",
    }
)
# The manifest loaders: the only place a config may still be a raw mapping (it is parsed YAML there).
LOADER_FILE = re.compile(r"(^|/)(schema|[a-z_]*_schema|manifest)\.py$")


def source_files(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> list[Path]:
    """Every .py file of the project's packages, sorted (tests/, bench/ and docs/ are not packages)."""
    files: set[Path] = set()
    for package in packages:
        files.update((root / package).rglob("*.py"))
    return sorted(p for p in files if "__pycache__" not in p.parts)


def module_name(path: Path, root: Path = ROOT) -> str:
    """The dotted module name of a file under root (`pkg/__init__.py` is `pkg`); the project's
    own files by pyproject's package-dir (`trainer/train.py` is `retformer.trainer.train`)."""
    if root == ROOT:
        return module_of(path)
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    """True for `if TYPE_CHECKING:` / `if typing.TYPE_CHECKING:` (imports that never run)."""
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement at any depth (module, function, class), except under TYPE_CHECKING."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module a `from ... import` names, resolving its leading dots."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _project_module(name: str, modules: set[str]) -> str | None:
    """The longest prefix of a dotted name that is a project module, or None for outside imports."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def import_graph(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """Module -> the project modules it imports (a package's own `__init__` is not an edge of its
    submodules: Python runs it first, but it is the package's import, not the submodule's)."""
    paths = {module_name(p, root): p for p in source_files(root, packages)}
    modules = set(paths)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in paths.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        is_package = path.name == "__init__.py"
        for node in _import_nodes(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = _absolute(node, module, is_package)
                # `from pkg import sub` imports the module pkg.sub when there is one, else a name of pkg.
                targets = [f"{base}.{alias.name}" for alias in node.names]
            for target in targets:
                found = _project_module(target, modules)
                if found and found != module:
                    graph[module].add(found)
    return graph


def tangles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of two or more modules (Tarjan): each is one or more circles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One concrete cycle (a closed path of modules) per tangle of the graph."""
    return [_shortest_cycle(graph, component) for component in tangles(graph)]


def _shortest_cycle(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """The shortest cycle through the component's first module (breadth-first inside the component)."""
    start = min(component)
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node] & component):
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [*reversed(path), start]
                if nxt not in previous:
                    previous[nxt] = node
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"no cycle in component {sorted(component)}")


def long_files() -> list[tuple[str, int]]:
    """(file, lines) for every package file over MAX_LINES lines."""
    found = []
    for path in source_files():
        count = len(path.read_text(encoding="utf-8").splitlines())
        if count > MAX_LINES:
            found.append((str(path.relative_to(ROOT)), count))
    return found


def _docstring_lines(tree: ast.AST) -> set[int]:
    """Line numbers of module, class and function docstrings (and other bare string statements)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            lines.update(range(node.lineno, (node.end_lineno or node.lineno) + 1))
    return lines


def _decorator_and_import_lines(tree: ast.AST) -> set[int]:
    """Line numbers of import statements and decorators (boilerplate that repeats by nature)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            lines.update(range(node.lineno, (node.end_lineno or node.lineno) + 1))
        for decorator in getattr(node, "decorator_list", []):
            lines.update(range(decorator.lineno, (decorator.end_lineno or decorator.lineno) + 1))
    return lines


# A line of closing brackets only (with an optional comma/colon), like `)`, `],`, `}) -> None:`.
_CLOSING = re.compile(r"^[)\]}]+[,:]?$|^\)\s*->.*:$")


def significant_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, whitespace-normalised text) of the lines that count for repetition: blank, comment,
    import, decorator, docstring and closing-bracket lines are left out."""
    text = path.read_text(encoding="utf-8")
    tree = ast.parse(text, str(path))
    skip = _docstring_lines(tree) | _decorator_and_import_lines(tree)
    kept = []
    for number, line in enumerate(text.splitlines(), start=1):
        normal = " ".join(line.split())
        if not normal or normal.startswith("#") or number in skip or _CLOSING.match(normal):
            continue
        kept.append((number, normal))
    return kept


def repeated_blocks() -> list[list[tuple[str, int, int]]]:
    """The repeats of `find_repeats` across all the packages (after the namespace move, one package)."""
    return find_repeats({str(p.relative_to(ROOT)): significant_lines(p) for p in source_files()})


def find_repeats(lines: dict[str, list[tuple[int, str]]]) -> list[list[tuple[str, int, int]]]:
    """Groups of places (file, first line, last line) where MIN_BLOCK or more significant lines repeat,
    given each file's significant lines. Overlapping windows of one repeat are merged, so a repeat of ten
    lines is one block, not five."""
    windows: dict[tuple[str, ...], list[tuple[str, int]]] = defaultdict(list)
    for name, kept in lines.items():
        for i in range(len(kept) - MIN_BLOCK + 1):
            windows[tuple(text for _, text in kept[i : i + MIN_BLOCK])].append((name, i))
    # (file, window index) -> every place its text appears, for the windows that appear twice or more
    # without overlapping themselves (a run of identical lines is not a copy).
    twins: dict[tuple[str, int], frozenset[tuple[str, int]]] = {}
    for places in windows.values():
        spans = sorted(places)
        if len(spans) < 2 or any(f == g and j - i < MIN_BLOCK for (f, i), (g, j) in pairwise(spans)):
            continue
        for place in spans:
            twins[place] = frozenset(spans)

    def shifted(places: frozenset[tuple[str, int]], by: int) -> frozenset[tuple[str, int]]:
        return frozenset((f, i + by) for f, i in places)

    blocks = []
    for (name, i), places in sorted(twins.items()):
        # Start a block only at its first window, and report it once (from its first place).
        if twins.get((name, i - 1)) == shifted(places, -1) or (name, i) != min(places):
            continue
        length = 1
        while twins.get((name, i + length)) == shifted(places, length):
            length += 1
        blocks.append(
            [(f, lines[f][j][0], lines[f][j + length + MIN_BLOCK - 2][0]) for f, j in sorted(places)]
        )
    return blocks


def _annotation_is_any_dict(annotation: ast.expr | None) -> bool:
    """True for `dict[str, Any]` (also `Dict`, `Mapping`, `MutableMapping`) and a bare `dict` (no more
    typed than it), also as a member of `X | None`, `Optional[...]`, `Union[...]` or quoted; False inside
    another container (a list of configs is not a config)."""
    if annotation is None:
        return False
    if isinstance(annotation, ast.Constant) and isinstance(annotation.value, str):
        return _annotation_is_any_dict(ast.parse(annotation.value, mode="eval").body)
    if isinstance(annotation, ast.BinOp) and isinstance(annotation.op, ast.BitOr):
        return _annotation_is_any_dict(annotation.left) or _annotation_is_any_dict(annotation.right)
    if isinstance(annotation, ast.Name | ast.Attribute):
        return ast.unparse(annotation).removeprefix("typing.") in ("dict", "Dict")
    if not isinstance(annotation, ast.Subscript):
        return False
    container = ast.unparse(annotation.value).removeprefix("typing.").removeprefix("collections.abc.")
    members = annotation.slice.elts if isinstance(annotation.slice, ast.Tuple) else [annotation.slice]
    if container in ("Optional", "Union"):
        return any(_annotation_is_any_dict(member) for member in members)
    untyped = [ast.unparse(m).removeprefix("typing.") for m in members] == ["str", "Any"]
    return container in ("dict", "Dict", "Mapping", "MutableMapping") and untyped


def untyped_config_parameters() -> list[str]:
    """`file:line function(parameter)` for every config-named parameter annotated `dict[str, Any]`
    outside the manifest loaders."""
    found = []
    for path in source_files():
        name = str(path.relative_to(ROOT))
        if LOADER_FILE.search(name):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            args = node.args
            for arg in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]:
                if arg is None or not _annotation_is_any_dict(arg.annotation):
                    continue
                if CONFIG_WORDS & set(arg.arg.lower().strip("_").split("_")):
                    found.append(f"{name}:{arg.lineno} {node.name}({arg.arg})")
    return found


# --- the rules ------------------------------------------------------------------------------------------


def test_no_import_cycles():
    """The project's import graph (module- and function-level imports, relative ones resolved, TYPE_CHECKING
    imports left out) has no circle; the failure names one cycle per tangle."""
    graph = import_graph()
    found = tangles(graph)
    report = "\n".join(
        f"{' -> '.join(_shortest_cycle(graph, tangle))}   (tangle: {', '.join(sorted(tangle))})"
        for tangle in found
    )
    assert not found, f"import cycles:\n{report}"


def test_no_long_files():
    """No package .py file has more than 450 lines; the failure lists each file and its length."""
    found = long_files()
    assert not found, "files over 450 lines:\n" + "\n".join(f"{n} ({c} lines)" for n, c in found)


def test_no_repeated_blocks():
    """No block of six or more significant lines (whitespace normalised; blank, comment, import, decorator,
    docstring and closing-bracket lines left out) appears twice in the packages; the failure lists every
    repeated block with its places."""
    found = repeated_blocks()
    report = "\n".join(" = ".join(f"{f}:{a}-{b}" for f, a, b in places) for places in found)
    assert not found, f"{len(found)} repeated blocks:\n{report}"


def test_no_untyped_config_parameters():
    """No function outside the manifest loaders (schema modules, artifacts/manifest.py) takes a
    config-named parameter annotated `dict[str, Any]` (or a bare `dict`, `Mapping[str, Any]`); the
    failure lists each one."""
    found = untyped_config_parameters()
    assert not found, f"{len(found)} config parameters typed dict[str, Any]:\n" + "\n".join(found)


# --- the checkers themselves ----------------------------------------------------------------------------


def test_cycles_finds_a_circle_and_only_circles():
    """`cycles` reports a three-module circle once, as a closed path, and ignores a chain and a self-edge."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "d"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_import_graph_resolves_relative_and_function_level_imports(tmp_path):
    """Relative imports resolve against the module (or package) that makes them, `from pkg import sub`
    is an edge to the submodule, an import inside a function is an edge, and one under TYPE_CHECKING or of
    an outside package is not."""
    files = {
        "p/__init__.py": "from p.q import a\n",
        "p/q/__init__.py": "from . import a\n",
        "p/q/a.py": "import os\nfrom .b import x\nfrom ..c import y\n",
        "p/q/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from p.c import y\nx = 1\n",
        "p/c.py": "def f():\n    from p.q.b import x\n    return x\ny = 2\n",
    }
    for name, code in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(code)
    assert import_graph(tmp_path, ("p",)) == {
        "p": {"p.q.a"},
        "p.q": {"p.q.a"},
        "p.q.a": {"p.q.b", "p.c"},
        "p.q.b": set(),
        "p.c": {"p.q.b"},
    }


def test_annotation_matcher_reads_the_spellings_of_dict_str_any():
    """`dict[str, Any]` is matched alone, optional and quoted, and so are a bare `dict` and
    `Mapping[str, Any]`; `dict[str, int]` and `list[dict[str, Any]]` (a list of configs is not a
    config) are not."""

    def parse(text: str) -> ast.expr:
        return ast.parse(f"x: {text}").body[0].annotation  # type: ignore[attr-defined]

    assert _annotation_is_any_dict(parse("dict[str, Any]"))
    assert _annotation_is_any_dict(parse("dict[str, Any] | None"))
    assert _annotation_is_any_dict(parse("Optional[Dict[str, Any]]"))
    assert _annotation_is_any_dict(parse("'dict[str, Any]'"))
    assert _annotation_is_any_dict(parse("dict"))
    assert _annotation_is_any_dict(parse("dict | None"))
    assert _annotation_is_any_dict(parse("Mapping[str, Any]"))
    assert not _annotation_is_any_dict(parse("dict[str, int]"))
    assert not _annotation_is_any_dict(parse("list[dict[str, Any]]"))


def test_find_repeats_merges_a_long_repeat_and_ignores_short_ones():
    """A repeat of eight lines in two files is one block with both places and their first/last lines; five
    repeated lines and a run of one identical line are no repeat."""
    body = [f"x{i} = {i}" for i in range(8)]
    lines = {
        "a.py": list(enumerate(["a = 1", *body], start=1)),
        "b.py": list(enumerate([*body, "b = 2"], start=10)),
        "c.py": list(enumerate(body[:5], start=1)),
        "d.py": list(enumerate(["pass"] * 12, start=1)),
    }
    assert find_repeats(lines) == [[("a.py", 2, 9), ("b.py", 10, 17)]]
