"""One rank of the row-block checks (tests/test_row_blocks.py), on 2 ranks under ZeRO-3.

1. The same full-rank model built, initialised and stepped twice with and without its embedding
   and head in row blocks (``model.split_vocab``), every collective that lands on every rank
   recorded: the largest one moved, and the per-step losses.
2. The blocked engine saved (``write_state``): rank 0 reads every whole tensor of the sets and
   compares it with the blocks' own masters and moments side by side.
3. That checkpoint loaded into fresh engines with and without row blocks (``load_weights``):
   every param's master must equal the saved rows.

Prints one ``RESULT {json}`` line per rank."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from rank_tools import Recorder, report_and_exit

from ds_relora.checkpoint.format import MOMENTS_SET, WEIGHTS
from ds_relora.checkpoint.state_io import load_weights, write_state
from ds_relora.methods.schedule import JaggedCosine
from ds_relora.models import build_model, largest_linear, llama_config, preset_shape, vocab_block
from ds_relora.row_blocks import whole_names
from ds_relora.tensor_files import TensorSet
from ds_relora.train.engine import build_engine, release_engine
from ds_relora.worker import init_distributed
from ds_relora.zero.state import MOMENTS, get_master, get_moment

VOCAB, SEQ = 512, 16
# No prefetch: a prefetch gathers several params in one flat buffer up to its config-sized bucket
# (counted apart from the model-sized transients), which would hide what one fetch moves.
DS = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
      "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": 0}}


def engine_of(split: bool):
    shape = preset_shape("tiny")
    model = build_model(llama_config(shape, VOCAB, SEQ, attn_implementation="eager"), seed=0, ds_config=DS,
                        vocab_block=vocab_block(shape.hidden) if split else None)
    return build_engine(model, DS, lr=1e-3, eps=1e-6, schedule=JaggedCosine(10, 0, 0.1),
                        groups=[{"params": list(model.parameters()), "weight_decay": 0.0}])


def train(recorder: Recorder, split: bool) -> tuple:
    recorder.on, recorder.largest_bytes = True, 0
    engine = engine_of(split)
    losses = []
    for step in range(2):
        ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(10 * step + dist.get_rank()))
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    recorder.on = False
    return engine, {"largest_collective_bytes": recorder.largest_bytes, "losses": losses}


def saved_rows(engine, folder: Path) -> dict:
    """Every whole tensor of the sets against its blocks' masters and moments (rank 0 compares)."""
    blocks = whole_names(engine.module)
    weights = TensorSet(folder, WEIGHTS) if dist.get_rank() == 0 else None
    moments = TensorSet(folder, MOMENTS_SET) if dist.get_rank() == 0 else None
    differ, checked = [], 0
    for name, p in engine.module.named_parameters():  # the getters are collective: every rank runs them
        whole, start, stop, _ = blocks.get(name, (name, None, None, None))
        expected = {whole: get_master(engine, p)} | {f"{whole}.{k}": get_moment(engine, p, k) for k in MOMENTS}
        if weights is None:
            continue
        for key, value in expected.items():
            stored = (weights if key == whole else moments).get(key)
            stored = stored if start is None else stored[start:stop]
            checked += 1
            if not torch.equal(stored, value.reshape(stored.shape)):
                differ.append(key)
    names = weights.keys() + moments.keys() if weights is not None else []
    return {"differ": differ, "checked": checked, "block_names_saved": [n for n in names if ".blocks." in n]}


def loaded(folder: Path, split: bool) -> list[str]:
    """Load the checkpoint into a fresh engine; the params whose master differs from the saved rows."""
    engine = engine_of(split)
    saved = TensorSet(folder, WEIGHTS)
    load_weights(engine.module, saved, source=str(folder), engine=engine)
    blocks = whole_names(engine.module)
    differ = []
    for name, p in engine.module.named_parameters():
        whole, start, stop, _ = blocks.get(name, (name, None, None, None))
        value = saved.get(whole)
        if not torch.equal(get_master(engine, p), value if start is None else value[start:stop]):
            differ.append(name)
    release_engine(engine)
    return differ


def main() -> None:
    init_distributed()
    recorder = Recorder()
    folder = Path(sys.argv[1])
    _, unsplit = train(recorder, split=False)
    engine, split = train(recorder, split=True)
    split["blocks"] = len(whole_names(engine.module))
    if dist.get_rank() == 0:
        folder.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    write_state(engine, folder, with_moments=True)
    dist.barrier()
    result = {"unsplit": unsplit, "split": split, "saved": saved_rows(engine, folder)}
    release_engine(engine)
    result["load_differ"] = {"split": loaded(folder, True), "unsplit": loaded(folder, False)}
    result["largest_linear"], result["vocab_param"] = largest_linear(preset_shape("tiny")), VOCAB * preset_shape("tiny").hidden
    report_and_exit(result)


if __name__ == "__main__":
    main()
