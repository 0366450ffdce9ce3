"""Datamodules, dataset readers per on-disk format, transforms and synthetic generators."""
