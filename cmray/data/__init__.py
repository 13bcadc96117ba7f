"""Data: the 2D toy distributions, and images from sources to shards to training batches."""
