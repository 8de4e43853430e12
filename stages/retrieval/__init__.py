"""Retrieval and its scores: embedding, exact top-K, protocols, matching metrics, mined negatives and candidates, re-ranking, WHM."""
