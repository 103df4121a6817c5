"""Benchmark scripts; each prints figures as ratios against a baseline measured in the same run.

Run them as modules from the repository root, ``.venv/bin/python -m bench.engine``: run as
files, their folder would come first on ``sys.path`` and ``bench/queue.py`` would shadow the
standard library's ``queue`` module.
"""
