"""One rank of the ZeRO-1/2 step checks (tests/test_train_engine.py), on 2 ranks.

For each case (ZeRO stage, gradient accumulation, overlap_comm, bf16, a parameter that gets no
gradient) two engines train the same model on the same batches: DeepSpeed as it is, and with
``zero/grad_order.write_grads_in_partition_order`` and ``zero/weight_gather`` (the weights
gathered after each step in buckets on gloo). Sizes are odd so that partitions cut through
parameters and the last rank's partition is padded; matrices and vectors are two param groups
(each its own partition, and each its own gradient buffer with the layout). Reported per case: whether the layout was
installed, the losses, the largest difference in module params, fp32 masters and Adam moments
(all must be 0: the sums are the same), and how many times DeepSpeed's step concatenated the
rank's gradient partition (``flatten``) with and without the layout, the most elements one gather
of the weights moved, and how many gradient buffers outlived the step (none may: a buffer held
past its group's step is memory the step was meant to free). The parameter that gets no
gradient comes first in rank 0's partition: DeepSpeed lists a zeros tensor of its own for it,
so that rank keeps DeepSpeed's copy, while rank 1 steps in place.

Prints one ``RESULT {json}`` line per rank."""

import gc
import sys
import weakref

import torch

from rank_tools import report_and_exit

from ds_relora.worker import init_distributed
from ds_relora.zero import weight_gather
from ds_relora.zero.grad_order import write_grads_in_partition_order

CASES = [
    {"stage": 1, "accum": 1, "overlap": False, "bf16": False, "unused": False},
    {"stage": 2, "accum": 1, "overlap": True, "bf16": False, "unused": False},
    {"stage": 2, "accum": 2, "overlap": False, "bf16": False, "unused": False},
    {"stage": 2, "accum": 1, "overlap": False, "bf16": True, "unused": False},
    {"stage": 2, "accum": 1, "overlap": True, "bf16": False, "unused": True},
]
STEPS, MICRO, BUCKET = 3, 2, 500


class Toy(torch.nn.Module):
    def __init__(self, unused: bool):
        super().__init__()
        self.emb = torch.nn.Embedding(53, 23)
        self.up = torch.nn.Linear(23, 37)
        self.down = torch.nn.Linear(37, 23, bias=False)
        self.head = torch.nn.Linear(23, 53)
        self.spare = torch.nn.Parameter(torch.randn(7)) if unused else None

    def forward(self, ids):
        h = self.emb(ids)
        h = h + self.down(torch.tanh(self.up(h)))
        return torch.nn.functional.cross_entropy(self.head(h).flatten(0, 1), ids.roll(-1, 1).flatten())


def train(case: dict, layout: bool, rank: int):
    import importlib  # noqa: PLC0415

    import deepspeed  # noqa: PLC0415
    from deepspeed import comm  # noqa: PLC0415

    callers = [importlib.import_module(name) for name in weight_gather.CALLERS]
    originals = [m.all_gather_dp_groups for m in callers]
    if layout:
        weight_gather.gather_weights_in_buckets_on_gloo()
    gathered = [0]
    comm_originals = {name: getattr(comm, name) for name in ("all_gather_into_tensor", "all_gather")}
    for name, original in comm_originals.items():

        def recorded(out, *args, _original=original, **kwargs):
            gathered[0] = max(gathered[0], sum(t.numel() for t in out) if isinstance(out, list) else out.numel())
            return _original(out, *args, **kwargs)

        setattr(comm, name, recorded)
    torch.manual_seed(0)
    model = Toy(case["unused"])
    config = {
        "train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": case["accum"],
        "train_batch_size": MICRO * case["accum"] * 2,
        "zero_optimization": {"stage": case["stage"], "overlap_comm": case["overlap"], "contiguous_gradients": True,
                              "reduce_bucket_size": BUCKET, "allgather_bucket_size": BUCKET},
        "bf16": {"enabled": case["bf16"]}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9,
    }
    groups = [{"params": [p for p in model.parameters() if p.dim() > 1], "weight_decay": 0.1},
              {"params": [p for p in model.parameters() if p.dim() <= 1], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=1e-2, fused=True)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    installed = write_grads_in_partition_order(engine.optimizer) if layout else False
    flattens = [0]
    zero_opt = engine.optimizer
    for name in ("flatten", "flatten_dense_tensors_aligned"):
        original = getattr(zero_opt, name)

        def counted(tensors, *args, _original=original, **kwargs):
            flattens[0] += any(tensors is g for g in zero_opt.averaged_gradients.values())
            return _original(tensors, *args, **kwargs)

        setattr(zero_opt, name, counted)
    gen = torch.Generator().manual_seed(1 + rank)
    losses = []
    alive_after_step = 0
    for _ in range(STEPS * case["accum"]):
        ids = torch.randint(0, 53, (MICRO, 9), generator=gen)
        loss = engine(ids)
        engine.backward(loss)
        storages = [weakref.ref(g.untyped_storage()) for pieces in zero_opt.averaged_gradients.values()
                    for g in (pieces or []) if not getattr(g, "_zero_padding", False)]
        assert storages or not engine.is_gradient_accumulation_boundary()
        engine.step()
        losses.append(loss.item())
        gc.collect()
        alive_after_step = max(alive_after_step, sum(ref() is not None for ref in storages))
    for module, original in zip(callers, originals):
        module.all_gather_dp_groups = original
    for name, original in comm_originals.items():
        setattr(comm, name, original)
    params = [p.detach().float().clone() for p in engine.module.parameters()]
    masters = [t.detach().clone() for t in zero_opt.single_partition_of_fp32_groups]
    moments = [s[k].clone() for s in zero_opt.optimizer.state.values() for k in ("exp_avg", "exp_avg_sq")]
    padded = int(sum(zero_opt.partition_size)) * 2 > sum(p.numel() for p in model.parameters())
    return installed, losses, params, masters, moments, flattens[0], padded, gathered[0], alive_after_step


def largest_difference(a: list, b: list) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def main():
    init_distributed()
    rank = torch.distributed.get_rank()
    out = []
    for case in CASES:
        _, losses_ds, params_ds, masters_ds, moments_ds, flattens_ds, _, gathered_ds, _ = train(case, False, rank)
        installed, losses, params, masters, moments, flattens, padded, gathered, alive = train(case, True, rank)
        out.append({**case, "installed": installed, "padded": padded, "gathered": gathered, "gathered_ds": gathered_ds,
                    "grad_buffers_alive_after_step": alive, "losses_equal": losses == losses_ds,
                    "params": largest_difference(params, params_ds), "masters": largest_difference(masters, masters_ds),
                    "moments": largest_difference(moments, moments_ds), "flattens": flattens, "flattens_ds": flattens_ds})
    report_and_exit({"rank": rank, "cases": out})


if __name__ == "__main__":
    sys.exit(main())
