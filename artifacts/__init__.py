"""On-disk contracts shared by every layer: errors, atomic writes, workspace paths, manifests, formats.

This package imports none of kb_builder, trainer or pipelines.
"""
