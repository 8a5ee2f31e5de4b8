"""Scaling studies: sweep files expanded into validated runs (``ds-relora sweep``), their
comparison as one table and a few plots (``ds-relora compare``), and downstream evaluation
through lm-evaluation-harness (``ds-relora eval --tasks``)."""
