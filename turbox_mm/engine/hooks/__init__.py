"""Hooks (one a file). The system-layer hooks (GC, CPU affinity, EMA) land here."""
