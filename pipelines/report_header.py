"""report.html's header block: what made the run and how to look at it.

- the encoders (image and text): eval.json's `encoders` where it records them, else the KB's embed
  record in the run's workspace (`kb/<kb>/_stages/embed.json`, what the vectors were made with);
- the KB's size (rows of its index) and the index's measured recall (`kb/<kb>/index/index.json`'s
  `n` and `recall_check`, written by the index stage after its recall check);
- the git commit of the code that wrote the report (`git rev-parse --short HEAD` in the package's
  folder; "unknown" outside a git checkout or without git);
- the `retformer browse` command that opens this run.

Each fact that cannot be read says why instead; the header never stops a report from being written.
"""

from __future__ import annotations

import html
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retformer.artifacts.names import INDEX_JSON
from retformer.artifacts.workspace import Workspace, read_json

DEFAULT_WORKDIR = "work"  # the CLI's --workdir default (pipelines/cli.py)


def run_workspace(run_dir: Path) -> Workspace | None:
    """The workspace a run folder belongs to (`<root>/runs/<run>`), None for a folder elsewhere."""
    run_dir = Path(run_dir).resolve()
    return Workspace(run_dir.parent.parent) if run_dir.parent.name == "runs" else None


def code_commit(where: Path | None = None) -> str:
    """The short commit hash of the git checkout holding `where` (default: this package), "unknown" when
    it is no checkout, git is missing or does not answer within 10 s."""
    folder = Path(where) if where is not None else Path(__file__).resolve().parent
    try:
        proc = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    commit = proc.stdout.strip()
    return commit if proc.returncode == 0 and commit else "unknown"


@dataclass(frozen=True)
class EncoderRecord:
    """An encoder as eval.json or a KB's embed record names it: its `name`, then its other keys in the
    record's order. Read leniently (`read`): the header never fails on an old record."""

    name: str
    params: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def read(cls, recorded: object) -> EncoderRecord | None:
        """The record's encoder entry; None where it is missing or empty, its text as the name where it is
        no mapping."""
        if not recorded:
            return None
        if not isinstance(recorded, dict):
            return cls(str(recorded))
        return cls(str(recorded.get("name")), tuple((str(k), v) for k, v in recorded.items() if k != "name"))

    def __str__(self) -> str:
        """`efficientnet_lite0 (image_size=64)`: the name, then every other key of the record."""
        rest = ", ".join(f"{k}={v}" for k, v in self.params)
        return self.name + (f" ({rest})" if rest else "")


def _encoder(encoder: EncoderRecord | None) -> str:
    """The encoder's text, "none" where the record names none."""
    return "none" if encoder is None else str(encoder)


def browse_command(run_dir: Path, ws: Workspace | None, cwd: Path | None = None) -> str:
    """The command that opens the run in the browser: its name when the workspace is the default
    `work/` of the folder the report was written from, else with `--workdir`; a run folder outside a
    workspace by its path."""
    name = Path(run_dir).name
    if ws is None:
        return f"retformer browse '{Path(run_dir).resolve()}'"
    here = (Path(cwd) if cwd is not None else Path.cwd()) / DEFAULT_WORKDIR
    if ws.root.resolve() == here.resolve():
        return f"retformer browse '{name}'"
    return f"retformer browse '{name}' --workdir '{ws.root.resolve()}'"


def header_facts(run_dir: Path, report: dict[str, Any]) -> dict[str, str]:
    """The header's facts as label -> text (see the module doc), in display order."""
    ws = run_workspace(run_dir)
    kb = str(report.get("kb"))
    encoders = report.get("encoders")
    source = "eval.json"
    if not encoders and ws is not None:
        encoders = (read_json(ws.kb_stage_record(kb, "embed"), torn_ok=True) or {}).get("encoders")
        source = f"KB {kb}'s embed record"
    facts: dict[str, str] = {}
    if encoders:
        facts["image encoder"] = f"{_encoder(EncoderRecord.read(encoders.get('image')))} ({source})"
        facts["text encoder"] = f"{_encoder(EncoderRecord.read(encoders.get('text')))} ({source})"
    else:
        where = "the run is outside a workspace" if ws is None else f"no embed record for KB {kb}"
        facts["encoders"] = f"unknown ({where})"
    index = read_json(ws.kb_index(kb) / INDEX_JSON, torn_ok=True) if ws is not None else None
    if index:
        check = index.get("recall_check") or {}
        facts["KB size"] = f"{index.get('n'):,} rows in its index ({index.get('factory')})"
        facts["index recall"] = (
            f"{check['recall']:.3f} at k={check.get('k')} over {check.get('queries')} queries "
            f"(target {check.get('target')})"
            if check.get("recall") is not None
            else "not measured"
        )
    else:
        facts["KB size"] = f"unknown (no index record for KB {kb})"
    facts["code commit"] = code_commit()
    facts["browse"] = browse_command(run_dir, ws)
    return facts


def header_html(run_dir: Path, report: dict[str, Any]) -> str:
    """The header block: a two-column table of `header_facts`, the browse command as code."""
    rows = []
    for label, text in header_facts(run_dir, report).items():
        value = f"<code>{html.escape(text)}</code>" if label == "browse" else html.escape(text)
        rows.append(f"<tr><th>{html.escape(label)}</th><td>{value}</td></tr>")
    return f"<table class='header'>{''.join(rows)}</table>"
