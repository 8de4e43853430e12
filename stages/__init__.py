"""DVC stages (`python -m stages.<name>`) and the data code they share."""
