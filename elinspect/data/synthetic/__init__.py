"""Synthetic datasets written in their publishers' on-disk layouts.

Each generator writes a small dataset exactly as the real one ships, so the real readers
are what the tests exercise: ``pvel`` (PVEL-AD, Pascal VOC 2007), ``folder`` (normal /
defect / mask directories for ``data=folder``). Command line:
``python -m elinspect.data.synthetic <generator> --help``.
"""
