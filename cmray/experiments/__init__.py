"""End-to-end experiments built from the core, data, train and eval layers."""
