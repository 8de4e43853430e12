"""The WebDataset shards: their layout, writing, index and readers (store), and the batch loaders of training (loaders)."""
