"""Benchmarks: the shaped multi-host testbed, the scenarios run on it, and the data-plane run.

``make bench`` runs ``python -m benchmarks.run_all``. Results land in
``benchmarks/results/`` as one JSON file per scenario and day.
"""
