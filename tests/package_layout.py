"""Where each module of the `retformer` namespace lives in the repository: pyproject's setuptools
`package-dir` maps `retformer.trainer` onto trainer/ (and artifacts/, kb_builder/, pipelines/ alike), so a
module's file is not found by its dots alone. The import-graph tests read the source through this."""

from __future__ import annotations

import tomllib
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@cache
def package_dirs() -> dict[str, str]:
    """Package name -> its folder relative to the repository (pyproject's `[tool.setuptools]
    package-dir`), e.g. {"retformer": "retformer", "retformer.trainer": "trainer", ...}."""
    with open(REPO / "pyproject.toml", "rb") as fh:
        return dict(tomllib.load(fh)["tool"]["setuptools"]["package-dir"])


def module_file(module: str) -> Path | None:
    """The source file of a dotted module name (a package's `__init__.py`), or None when the name is no
    module of the repository (`retformer.trainer.train.fit` is an attribute, not a module)."""
    parts = module.split(".")
    # the longest mapped package the name starts with decides the folder
    for end in range(len(parts), 0, -1):
        folder = package_dirs().get(".".join(parts[:end]))
        if folder is not None:
            path = REPO / folder / Path(*parts[end:]) if parts[end:] else REPO / folder
            break
    else:
        return None
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else None


def module_of(path: Path) -> str:
    """The dotted module name of a source file of the repository (the inverse of module_file)."""
    rel = path.resolve().relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    # the mapped folder the file is in (the longest, should folders nest)
    by_folder = sorted(package_dirs().items(), key=lambda item: -len(Path(item[1]).parts))
    for package, folder in by_folder:
        depth = len(Path(folder).parts)
        if tuple(parts[:depth]) == Path(folder).parts:
            return ".".join([package, *parts[depth:]])
    raise ValueError(f"{path} is in no package of pyproject's package-dir")
