"""Baselines LongMem is measured against, behind the same interface (``longmem.evals.scoring.Scorer``)."""
