"""Offline knowledge-base pipeline of RetFormer: encoders, datasets, shards, embed, index, neighbours."""
