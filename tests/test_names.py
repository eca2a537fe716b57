"""The on-disk names every layer shares (artifacts/names.py)."""

from __future__ import annotations

from pathlib import Path

from retformer.artifacts.names import PREDICTIONS, prediction_file, safe_name
from retformer.pipelines.runs import predictions_path


def test_result_names_become_one_file_stem():
    """A result name maps to one file stem (characters outside [A-Za-z0-9_.-] become '-'), and the
    predictions file of a result is that stem under predictions/, relative or under a run folder."""
    assert safe_name("retformer@k8") == "retformer-k8"
    assert safe_name("mlp_only@val/x") == "mlp_only-val-x"
    assert safe_name("a.b_c-d") == "a.b_c-d"
    assert prediction_file("retformer@k8") == f"{PREDICTIONS}/retformer-k8.parquet"
    run = Path("/runs/r")
    assert predictions_path(run, "retformer@k8") == run / prediction_file("retformer@k8")
