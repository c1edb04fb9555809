"""Models: one folder a model, plus layers shared across models."""
