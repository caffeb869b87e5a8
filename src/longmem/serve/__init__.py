"""The HTTP service (``longmem serve``)."""
