"""Training loops and state."""
