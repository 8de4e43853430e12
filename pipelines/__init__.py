"""Prefect flows that drive the DVC graph in dvc.yaml."""
