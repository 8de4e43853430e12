"""The trained model's side of the stages: the model factory, tokenizers, vocabulary files, GloVe, the MiniLM sentence encoder."""
