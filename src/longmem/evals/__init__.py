"""Evaluations, one module each: passkey retrieval, long-text perplexity by length bucket,
ChapterBreak-style suffix identification and memory-augmented in-context learning.

Each takes a scorer (a LongMemModel, or anything with the same interface, see
:class:`longmem.evals.scoring.Scorer`) and a typed config, and returns a dataclass;
``longmem eval <name>`` wraps each one and writes a results JSON with plots.
"""
