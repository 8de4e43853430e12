"""PyTorch encoders, composition models and losses. Pure nn code: no file I/O, no params parsing."""
