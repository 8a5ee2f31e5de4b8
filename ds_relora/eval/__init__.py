"""Evaluation of a checkpoint or export: validation loss and perplexity (``evaluate``, ``ds-relora eval``) and the spectrum of the learned updates (``spectrum``)."""
