"""Data sources: toy distributions now; LSUN and image-folder shards later."""
