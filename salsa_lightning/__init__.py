"""SALSA: soup-based alignment learning as PyTorch Lightning modules."""

__version__ = "0.1.0"
