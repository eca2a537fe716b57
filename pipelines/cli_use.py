"""Commands that use a trained run: `retformer predict RUN IMAGE...` (the work is pipelines/use/).

Registered on the `retformer` app (pipelines/cli_app.py) by importing this module (pipelines/cli.py
does, before `main`).
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, TextIO

import typer
from tqdm.auto import tqdm

from retformer.artifacts.atomic import atomic_path
from retformer.artifacts.errors import UserError
from retformer.pipelines.cli_app import Ctx, command


@dataclass
class Summary:
    """What `retformer predict` tells at the end: counts over the records written, accuracy over the
    labelled ones (shard samples with a label in the run's classes)."""

    predicted: int = 0
    labelled: int = 0
    correct: int = 0
    ood: int = 0
    retrieval_used: int = 0
    skipped: list[str] = field(default_factory=list)

    def add(self, rec: dict[str, Any]) -> None:
        """Count one record."""
        self.predicted += 1
        self.labelled += rec["label"] is not None
        self.correct += bool(rec["correct"])
        self.ood += bool(rec["ood"])
        self.retrieval_used += bool(rec["retrieval_used"])

    @property
    def accuracy(self) -> float | None:
        """Top-1 over the labelled records (None without any)."""
        return self.correct / self.labelled if self.labelled else None

    def as_json(self, run: str, method: str, ood: dict[str, Any]) -> dict[str, Any]:
        """The `--json` summary object (the output's last line)."""
        acc = self.accuracy
        return {
            "summary": {
                "run": run,
                "method": method,
                "predicted": self.predicted,
                "skipped": len(self.skipped),
                "labelled": self.labelled,
                "correct": self.correct,
                "accuracy": None if acc is None else round(acc, 6),
                "ood": self.ood,
                "ood_threshold": ood["threshold"],
                "ood_rule": ood["rule"],
                "retrieval_used": self.retrieval_used,
            }
        }

    def accuracy_line(self) -> str | None:
        """`accuracy 81.50% (163 of 200 labelled images)`, or None when no record had a label."""
        acc = self.accuracy
        if acc is None:
            return None
        return f"accuracy {100 * acc:.2f}% ({self.correct} of {self.labelled} labelled images)"


@command()
def predict(
    ctx: Ctx,
    run: Annotated[
        str,
        typer.Argument(
            help="A run folder, a run name under <workdir>/runs (a pattern picks the newest match: "
            "'fmnist_lt-fmnist_world-demo-*'), or a model file (<run>/<method>.pt)."
        ),
    ],
    images: Annotated[
        list[Path],
        typer.Argument(help="Image files, folders (searched recursively) or webdataset shards (.tar)."),
    ],
    method: Annotated[
        str | None,
        typer.Option(
            "--method", help="The run's model to use (default: retformer, else the run's only model)."
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Write the JSON lines here (default: stdout).")
    ] = None,
    neighbors: Annotated[int, typer.Option("--neighbors", min=0, help="KB neighbors listed per image.")] = 5,
    batch_size: Annotated[
        int | None,
        typer.Option("--batch-size", min=1, help="Images per encoder forward (default: the KB's)."),
    ] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    kb: Annotated[
        str | None,
        typer.Option(
            "--kb",
            help="Search this KB instead of the run's (embedded with the run's encoders; or the run's KB "
            "grown since it was trained): new knowledge without retraining.",
        ),
    ] = None,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help='End the output with one summary line {"summary": {predicted, skipped, labelled, '
            "correct, accuracy, ood, ood_threshold, retrieval_used, ...}}.",
        ),
    ] = False,
) -> None:
    """Classify images with a trained run: embed them with the run's encoder, retrieve their neighbors
    from the run's KB (its tuned search parameters), run the model; one JSON line per image (path,
    class, score, top5, label / correct for a labelled shard sample, retrieval_used, mean_similarity,
    ood, neighbors with uid, caption, similarity). Unreadable images are named on stderr and skipped;
    with labelled shards an accuracy line ends stderr."""
    from retformer.pipelines.use.inputs import count_inputs, iter_inputs
    from retformer.pipelines.use.predictor import Predictor

    if out is not None and out.exists() and not out.is_file():  # was found after all the work
        raise UserError(
            f"--out {out} exists and is not a file: give the path of the JSON-lines file to write"
        )
    for noisy in ("retformer.kb_builder", "faiss"):  # index loading notes: not what a predict user asked for
        logging.getLogger(noisy).setLevel(logging.WARNING)
    predictor = Predictor.open(run, method, ctx.ws.root, device, kb=kb)
    total = count_inputs(images)
    summary = Summary()
    skipped = summary.skipped
    run_name = predictor.saved.path.parent.name

    def on_skip(name: str, reason: str) -> None:
        skipped.append(name)
        tqdm.write(f"warning: {name}: skipped ({reason})", file=sys.stderr)

    def write(fh: TextIO) -> int:
        records = predictor.predict_images(
            iter_inputs(images),
            neighbors=neighbors,
            batch_size=batch_size,
            on_skip=on_skip,
            progress=total is None or total > 32,
            total=total,
        )
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
            summary.add(rec)
        if as_json and summary.predicted:
            ood = predictor.ood_threshold().describe()
            fh.write(json.dumps(summary.as_json(run_name, predictor.method, ood), ensure_ascii=False) + "\n")
        fh.flush()
        return summary.predicted

    def none_read() -> UserError:
        return UserError(f"no image could be read among the inputs ({len(skipped)} skipped)")

    if out is None:
        if (written := write(sys.stdout)) == 0:
            raise none_read()
    else:
        with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as fh:
            if (written := write(fh)) == 0:
                raise none_read()  # before the rename: no empty --out file
    where = f" to {out}" if out is not None else ""
    thr = predictor.ood_threshold().value
    flagged = f"; {summary.ood} flagged ood (s < {thr:.4f})" if thr is not None and summary.ood else ""
    typer.echo(
        f"predicted {written} image(s) with {predictor.method} of {run_name}{where}"
        + (f"; {len(skipped)} skipped" if skipped else "")
        + flagged,
        err=True,
    )
    if (line := summary.accuracy_line()) is not None:
        typer.echo(line, err=True)
