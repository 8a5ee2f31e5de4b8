"""One rank of the ReLoRA-under-ZeRO checks (started by tests/harness/ranks.py).

Modes:
  checks  merge keeps logits, re-init reaches the fp32 masters, moment masks (per stage)
  losses  a short ReLoRA run with 2 merges; prints per-step losses
Prints one ``RESULT {json}`` line per stage on each rank.
"""

import argparse
import hashlib
import json
import os

import torch
import torch.distributed as dist

import deepspeed
from ds_relora.models import Shape, build_model, llama_config
from ds_relora.methods.schedule import JaggedCosine, merge_points
from ds_relora.zero.optim_reset import keep_mask, reset_moments
from ds_relora.methods.merging import merge_and_reinit
from ds_relora.methods.lora_layer import wrap_model
from ds_relora.config import RunConfig
from ds_relora.methods import get_method
from ds_relora.methods.lora_layer import kaiming_uniform_A
from ds_relora.zero.optim_reset import reset_generator
from ds_relora.zero.state import full_shape, get_master, get_moment, set_moment
from ds_relora.train.engine import build_engine
from ds_relora.worker import init_distributed

# Odd sizes so that ZeRO-1/2 flat partitions cut through params and ZeRO-3 partitions are uneven.
SHAPE = Shape(hidden=40, intermediate=75, layers=2, heads=4)
VOCAB, SEQ, RANK = 67, 12, 3


def ds_config(stage, bf16, micro, persist):
    zero = {"stage": stage}
    if stage == 3 and persist is not None:
        zero["stage3_param_persistence_threshold"] = persist
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "bf16": {"enabled": bool(bf16)},
        "steps_per_print": 10**9,
        "zero_allow_untested_optimizer": True,
    }


def make_model(dropout):
    model = build_model(llama_config(SHAPE, VOCAB, SEQ, attn_implementation="eager"), seed=0)
    modules = wrap_model(model, rank=RANK, alpha=6.0, dropout=dropout,
                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                         seed=1)
    return model, modules


def batch(step, rank, world, global_batch=4):
    # Learnable sequences (random start, fixed stride), so the losses fall and merges matter.
    g = torch.Generator().manual_seed(1000 + step)
    starts = torch.randint(0, VOCAB, (global_batch, 1), generator=g)
    data = (starts + 7 * torch.arange(SEQ)) % VOCAB
    per = global_batch // world
    return data[rank * per:(rank + 1) * per]


def train_step(engine, step, rank, world):
    x = batch(step, rank, world)
    loss = engine(input_ids=x, labels=x).loss
    engine.backward(loss)
    engine.step()
    out = loss.detach().clone()
    dist.all_reduce(out)
    return out.item() / world


def module_value(p):
    """Full module (low-precision) value of p, gathered under ZeRO-3."""
    with deepspeed.zero.GatheredParameters([p], modifier_rank=None, enabled=hasattr(p, "ds_id")):
        return p.data.detach().float().clone().reshape(full_shape(p))


def probe_logits(engine):
    x = torch.arange(SEQ).unsqueeze(0) % VOCAB
    engine.eval()
    with torch.no_grad():
        out = engine(input_ids=x).logits.float()
    engine.train()
    return out


def known_tensor(name, shape, tag):
    seed = int(hashlib.sha256(f"{name}/{tag}".encode()).hexdigest()[:8], 16)
    g = torch.Generator().manual_seed(seed)
    # Few distinct values: many ties, so a split-dependent tie-break would show up.
    return torch.randint(0, 9, shape, generator=g).float() / 8.0


def run_checks(stage, bf16, persist, rank, world):
    model, modules = make_model(dropout=0.0)
    engine = build_engine(model, ds_config(stage, bf16, 4 // world, persist), lr=1e-2,
                          schedule=JaggedCosine(100, 0))
    for t in range(3):
        train_step(engine, t, rank, world)
    before = probe_logits(engine)
    old_w = module_value(modules[0][1].weight)
    merge_and_reinit(engine, modules, seed=0, step=3, optimizer_reset="none")
    after = probe_logits(engine)
    new_w = module_value(modules[0][1].weight)

    def reinit_ok():
        ok_module, ok_master = True, True
        for idx, (_, m) in enumerate(modules):
            expect_a = kaiming_uniform_A(full_shape(m.lora_A), reset_generator(0, 3, idx))
            lp_a = expect_a.to(torch.bfloat16).float() if bf16 else expect_a
            ok_module &= torch.equal(module_value(m.lora_A), lp_a) and not module_value(m.lora_B).any()
            ok_master &= torch.equal(get_master(engine, m.lora_A), expect_a) and not get_master(engine, m.lora_B).any()
        return bool(ok_module), bool(ok_master)

    after_reinit = reinit_ok()
    for group in engine.optimizer.param_groups:
        group["lr"] = 0.0
    x = batch(3, rank, world)
    engine.backward(engine(input_ids=x, labels=x).loss)
    engine.step()
    after_lr0_step = reinit_ok()

    # Moments: inject known values, reset adapters, check what survived.
    trainable = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    for n, p in trainable:
        for key in ("exp_avg", "exp_avg_sq"):
            set_moment(engine, p, key, known_tensor(n, full_shape(p), key))
    digests, fractions, masks_ok = {}, {}, True
    adapters = {id(m.lora_A) for _, m in modules} | {id(m.lora_B) for _, m in modules}
    for n, p in trainable:
        if id(p) in adapters:
            reset_moments(engine, p, "magnitude", 0.9)
    others_untouched = True
    for n, p in trainable:
        m_now = get_moment(engine, p, "exp_avg")
        v_now = get_moment(engine, p, "exp_avg_sq")
        m0, v0 = known_tensor(n, full_shape(p), "exp_avg"), known_tensor(n, full_shape(p), "exp_avg_sq")
        if id(p) in adapters:
            expect = keep_mask(v0, "magnitude", 0.9)
            masks_ok &= torch.equal(m_now, m0 * expect) and torch.equal(v_now, v0 * expect)
            fractions[n] = float((~expect).sum()) / expect.numel()
            digests[n] = hashlib.sha256(expect.numpy().tobytes()).hexdigest()[:16]
        else:
            others_untouched &= torch.equal(m_now, m0) and torch.equal(v_now, v0)
    return {
        "stage": stage, "bf16": bf16, "rank": rank,
        "merge_logit_diff": (after - before).abs().max().item(),
        "logit_scale": before.abs().max().item(),
        "weight_changed": (new_w - old_w).abs().max().item(),
        "reinit_module": after_reinit[0], "reinit_master": after_reinit[1],
        "after_lr0_module": after_lr0_step[0], "after_lr0_master": after_lr0_step[1],
        "masks_ok": bool(masks_ok), "others_untouched": bool(others_untouched),
        "prune_fractions": fractions, "mask_digests": digests,
    }


def run_losses(stage, bf16, persist, rank, world, steps=12, reset_every=4):
    model, modules = make_model(dropout=0.0)
    schedule = JaggedCosine(steps, 2, 0.1, restart_every=reset_every, restart_warmup_steps=2)
    engine = build_engine(model, ds_config(stage, bf16, 4 // world, persist), lr=1e-2, schedule=schedule)
    cfg = RunConfig()
    cfg.train.total_steps, cfg.train.seed = steps, 0
    cfg.relora.reset_every, cfg.relora.optimizer_reset, cfg.relora.prune_ratio = reset_every, "magnitude", 0.9
    method = get_method("relora")
    method.layers = modules
    method.start_phase(cfg, 0, 0)
    assert method.merge_at == set(merge_points(steps, reset_every))
    losses, merges = [], []
    for t in range(steps):
        losses.append(train_step(engine, t, rank, world))
        event = method.after_step(engine, engine.lr_scheduler.last_epoch)
        if event:
            merges.append(event["step"])
    return {"stage": stage, "bf16": bf16, "rank": rank, "losses": losses, "merges": merges}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["checks", "losses"], required=True)
    ap.add_argument("--stages", default="0,1,2,3")
    ap.add_argument("--bf16", type=int, default=0)
    ap.add_argument("--persist", type=int, default=None)
    args, _ = ap.parse_known_args()
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    fn = run_checks if args.mode == "checks" else run_losses
    for stage in [int(s) for s in args.stages.split(",")]:
        res = fn(stage, args.bf16, args.persist, rank, world)
        print("RESULT " + json.dumps(res), flush=True)
        dist.barrier()
    # Skip interpreter teardown: native gloo/DeepSpeed threads occasionally abort at exit.
    os._exit(0)


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
