"""Data for training and evaluating IRMs: the built-in alignment corpora and neutral prompts,
the embedded model's preference pairs (``pairs/``) and its shipped precomputed results
(``precomputed``)."""
