"""cmray: consistency models trained at cluster scale."""

__version__ = "0.1.0"
