"""Ray Tune searches over N, mu, the metric d and the learning rate, with ASHA on sample
quality; ``pipelines/tune.py`` is the entry point."""
