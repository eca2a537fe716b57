"""RetFormer trainer: methods, the cross-fusion model, features, training, evaluation, baselines.

Feature mode: the encoders are frozen, so the trainer never sees an image. It reads the query
embeddings, the neighbor table (top-k KB row ids per query) and the compact neighbor store
written by the KB pipeline, and gathers the neighbors' embeddings per batch. Fine-tune mode
(`trainer/finetune.py`) trains the KB's image encoder with the head through the same epoch loop.
"""

from trainer.baselines import knn_vote
from trainer.checkpoint import (
    SavedModel,
    load_checkpoint,
    load_model,
    load_saved_model,
    save_checkpoint,
    save_model,
)
from trainer.evaluate import evaluate, shot_split_from_counts
from trainer.features import RetrievalFeatures, load_retrieval_features
from trainer.methods import METHODS
from trainer.model import LinearProbe, MLPOnly, RetFormer, build_model, model_from_config, neighbor_attention
from trainer.train import TrainConfig, fit, predict

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
