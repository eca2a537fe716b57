"""RetFormer trainer: in-memory retrieval features, the cross-fusion model, training, evaluation, baselines.

Feature mode: the encoders are frozen, so the trainer never sees an image. It reads the query
embeddings, the neighbour table (top-k KB row ids per query) and the compact neighbour store
written by the KB pipeline, and gathers the neighbours' embeddings per batch.
"""

from trainer.baselines import knn_vote
from trainer.evaluate import evaluate, shot_split_from_counts
from trainer.features import RetrievalFeatures, load_retrieval_features
from trainer.model import LinearProbe, MLPOnly, RetFormer, build_model, model_from_config, neighbour_attention
from trainer.train import TrainConfig, fit, load_checkpoint, load_model, predict, save_checkpoint

__all__ = [
    "LinearProbe",
    "MLPOnly",
    "RetFormer",
    "RetrievalFeatures",
    "TrainConfig",
    "build_model",
    "evaluate",
    "fit",
    "knn_vote",
    "load_checkpoint",
    "load_model",
    "load_retrieval_features",
    "model_from_config",
    "neighbour_attention",
    "predict",
    "save_checkpoint",
    "shot_split_from_counts",
]
