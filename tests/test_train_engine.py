"""The optimizer a run steps (ds_relora/train/engine.py ``make_optimizer``): the fused AdamW, on
the CPU too (offload, CPU ranks), and that it computes what the single-tensor loop does."""

from __future__ import annotations

import torch

from ds_relora.train import engine as engine_mod

OFFLOAD = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True}}}


def test_offload_optimizer_is_fused_on_the_cpu():
    params = [torch.nn.Parameter(torch.randn(4, 3))]
    opt = engine_mod.make_optimizer([{"params": params}], OFFLOAD, lr=1e-3)
    assert opt.defaults["fused"] is True, "optimizer offload steps in CPU memory: the fused CPU kernel"
    plain = engine_mod.make_optimizer([{"params": [torch.nn.Parameter(torch.randn(2))]}],
                                      {"zero_optimization": {"stage": 2}}, lr=1e-3)
    assert plain.defaults["fused"] is True, "no offload: fused where the params live (GPU, or CPU ranks)"


def test_fused_cpu_adamw_matches_the_single_tensor_loop():
    torch.manual_seed(0)
    shapes = [(64, 48), (48,), (7, 3)]
    start = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(25)]

    def run(fused):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        groups = [{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:], "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=3e-3, betas=(0.9, 0.95), eps=1e-8, fused=fused, foreach=False if not fused else None)
        for step, gs in enumerate(grads):
            for group in opt.param_groups:  # GaLore changes eps every step
                group["eps"] = 1e-8 * (1 + step)
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()
        return params, opt

    fused, opt_f = run(True)
    plain, opt_p = run(None)
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    for a, b in zip(fused, plain):
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt_f.state[a][key], opt_p.state[b][key], rtol=1e-6, atol=1e-9)


def test_zero12_steps_in_place_and_gathers_in_buckets_with_deepspeeds_sums():
    # tests/workers/grad_order_worker.py on 2 ranks: ZeRO-1 and -2 (overlap_comm, gradient
    # accumulation, bf16, a parameter with no gradient), DeepSpeed as it is against
    # zero/grad_order.py + zero/weight_gather.py. Same losses, params, masters and moments to the
    # bit; the layout's step concatenates no gradient partition, except for a param group whose
    # partition holds the parameter without a gradient (DeepSpeed's own zeros tensor for it),
    # which keeps DeepSpeed's copy; the weights are gathered a bucket at a time, not the whole
    # model at once.
    from harness.ranks import results, run_workers

    outs = results(run_workers(["tests/workers/grad_order_worker.py"], 2, timeout=300))
    assert sorted(r["rank"] for r in outs) == [0, 1]
    for r in outs:
        assert len(r["cases"]) == 5
        for case in r["cases"]:
            assert case["installed"] and case["losses_equal"], case
            assert case["grad_buffers_alive_after_step"] == 0, case
            assert case["params"] == case["masters"] == case["moments"] == 0.0, case
            assert case["flattens_ds"] >= 3, "DeepSpeed alone flattens the partition at every step"
            assert case["gathered"] <= 500 < 4000 < case["gathered_ds"], case  # allgather_bucket_size; the model
            if case["unused"] and r["rank"] == 0:  # that group alone (vectors) keeps the copy
                assert 0 < case["flattens"] < case["flattens_ds"], case
            else:
                assert case["flattens"] == 0, case
    assert any(c["padded"] for c in outs[0]["cases"]), "the last rank's padded tail is exercised"
