"""RetFormer trainer: methods, the cross-fusion model, features, training, evaluation, baselines.

Feature mode: the encoders are frozen, so the trainer never sees an image. It reads the query
embeddings, the neighbor table (top-k KB row ids per query) and the compact neighbor store
written by the KB pipeline, and gathers the neighbors' embeddings per batch. Fine-tune mode
(`trainer/finetune.py`) trains the KB's image encoder with the head through the same epoch loop.
"""

import importlib
from typing import Any

# Imported on first use (PEP 562): `import trainer.config` must not pull torch and timm in, so that
# checking a manifest stays fast.
_EXPORTS = {
    "LinearProbe": "trainer.model",
    "METHODS": "trainer.methods",
    "MLPOnly": "trainer.model",
    "RetFormer": "trainer.model",
    "RetrievalFeatures": "trainer.features",
    "SavedModel": "trainer.checkpoint",
    "TrainConfig": "trainer.train",
    "build_model": "trainer.model",
    "evaluate": "trainer.evaluate",
    "fit": "trainer.train",
    "knn_vote": "trainer.baselines",
    "load_checkpoint": "trainer.checkpoint",
    "load_model": "trainer.checkpoint",
    "load_retrieval_features": "trainer.features",
    "load_saved_model": "trainer.checkpoint",
    "model_from_config": "trainer.model",
    "neighbor_attention": "trainer.model",
    "predict": "trainer.train",
    "save_checkpoint": "trainer.checkpoint",
    "save_model": "trainer.checkpoint",
    "shot_split_from_counts": "trainer.evaluate",
}


__all__ = [
    "METHODS",
    "LinearProbe",
    "MLPOnly",
    "RetFormer",
    "RetrievalFeatures",
    "SavedModel",
    "TrainConfig",
    "build_model",
    "evaluate",
    "fit",
    "knn_vote",
    "load_checkpoint",
    "load_model",
    "load_retrieval_features",
    "load_saved_model",
    "model_from_config",
    "neighbor_attention",
    "predict",
    "save_checkpoint",
    "save_model",
    "shot_split_from_counts",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")
