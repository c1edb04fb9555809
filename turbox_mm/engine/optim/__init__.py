"""Optimizers, optim wrappers and their constructors."""
