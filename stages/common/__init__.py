"""Shared by every stage: params sections, errors, atomic outputs, checkpoints, devices, parallel runners, torchrun."""
