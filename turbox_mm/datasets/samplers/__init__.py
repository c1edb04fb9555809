"""Data samplers (sequence- and group-aware)."""
