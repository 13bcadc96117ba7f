"""Sample-quality evaluation."""
