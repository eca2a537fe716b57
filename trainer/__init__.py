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
    "LinearProbe": "retformer.trainer.image_models",
    "METHODS": "retformer.trainer.methods",
    "MLPOnly": "retformer.trainer.image_models",
    "RetFormer": "retformer.trainer.model",
    "RetrievalFeatures": "retformer.trainer.features",
    "SavedModel": "retformer.trainer.checkpoint",
    "TrainConfig": "retformer.trainer.train",
    "build_model": "retformer.trainer.model_factory",
    "evaluate": "retformer.trainer.evaluate",
    "fit": "retformer.trainer.train",
    "knn_vote": "retformer.trainer.baselines",
    "load_checkpoint": "retformer.trainer.checkpoint",
    "load_model": "retformer.trainer.checkpoint",
    "load_retrieval_features": "retformer.trainer.features",
    "load_saved_model": "retformer.trainer.checkpoint",
    "model_from_config": "retformer.trainer.model_factory",
    "neighbor_attention": "retformer.trainer.model",
    "parse_stored_model": "retformer.trainer.stored_model",
    "predict": "retformer.trainer.train",
    "save_checkpoint": "retformer.trainer.checkpoint",
    "save_model": "retformer.trainer.checkpoint",
    "shot_split_from_counts": "retformer.trainer.evaluate",
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
    "parse_stored_model",
    "predict",
    "save_checkpoint",
    "save_model",
    "shot_split_from_counts",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")
