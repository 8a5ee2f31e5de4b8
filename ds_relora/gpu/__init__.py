"""The GPU first-contact check (``python -m ds_relora.gpu``: ``check``) and its throughput pair (``bench``)."""
