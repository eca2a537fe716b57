"""Orchestration of RetFormer: the CLI, Dask scheduling of the stages, and the demo."""
