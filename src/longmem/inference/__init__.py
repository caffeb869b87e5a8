"""Using a model: reading long text and its perplexity (reader.py), incremental decoding and generation
(decode.py, generate.py), named memories held by sessions (session.py)."""
