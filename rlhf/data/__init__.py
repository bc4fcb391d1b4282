"""Data: reading datasets, recognising their format, tokenizing, masking, packing."""
