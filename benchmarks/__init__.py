"""Side-by-side measurements against peers and against the machine's limit (``make bench``)."""
