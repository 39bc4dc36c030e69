"""Retrieval metrics (placeholder until the metrics module lands in this same change)."""
