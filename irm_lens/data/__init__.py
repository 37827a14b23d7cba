"""Data for training and evaluating IRMs: the built-in alignment corpora and neutral prompts."""
