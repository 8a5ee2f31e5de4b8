"""Estimates before a run: per-GPU memory (``memory``, checked against live engines by ``engine_memory``), FLOPs per token (``flops``) and the ZeRO stage advice the CLI prints (``stage_advice``)."""
