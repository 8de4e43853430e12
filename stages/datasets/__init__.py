"""Datasets: one adapter module per source (registry.py names them), the two manifests every adapter writes,
the captions table of the matching datasets, and the downloader the real datasets fetch with."""
