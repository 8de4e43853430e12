"""Composed image retrieval models: a reference image plus a modification text -> the target image."""
