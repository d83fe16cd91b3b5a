"""Dataset readers, one per on-disk format."""
