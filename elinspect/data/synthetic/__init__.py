"""Synthetic datasets written in their publishers' on-disk layouts.

Each generator writes a small dataset exactly as the real one ships, so the real readers
are what the tests exercise: ``pvel`` (PVEL-AD, Pascal VOC 2007), ``folder`` (normal /
defect / mask directories for ``data=folder``), ``fabric`` (Tianchi 2019 round 2: folders with
aligned templates and the annotation JSON) and ``aluminum`` (Tianchi 2018 round 2: labelme JSON). Command line:
``python -m elinspect.data.synthetic <generator> --help``.
"""
