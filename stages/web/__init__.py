"""The local web page of `python -m stages.app`: the FastAPI application (server.py), the upload checks (uploads.py)
and the page itself (static/: plain HTML, CSS and one vanilla JS file, no build step)."""
