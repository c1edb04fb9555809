"""Data transforms with stock twins."""
