"""Image-text matching models: caption <-> image."""
