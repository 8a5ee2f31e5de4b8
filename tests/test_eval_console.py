"""``ds-relora eval`` of an exported (HF) model prints its JSON result and nothing from
transformers' loader: no "Loading weights" progress bar, no advisory logs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from harness import REPO


def test_eval_of_an_exported_model_prints_no_loading_progress(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from ds_relora.config import PrepareConfig
    from ds_relora.data import prepare_data

    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"text": f"def h{i}(z):\n    return z ** {i}\n"}) + "\n" for i in range(30)))
    data = prepare_data(PrepareConfig(source=str(src), vocab_size=300, val_fraction=0.3), tmp_path / "data", log=lambda _m: None)
    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(str(tmp_path / "model"))
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "ds_relora.cli", "eval", str(tmp_path / "model"), "--data", str(data),
                          "--seq-len", "16", "--max-batches", "1", "--device", "cpu"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert set(json.loads(res.stdout)) >= {"loss", "perplexity"}
    assert res.stderr == "", res.stderr[-3000:]
