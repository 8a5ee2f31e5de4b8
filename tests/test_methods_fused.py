"""Shared-input fusion (one dropout + one adapter GEMM for q/k/v and gate/up) and the ZeRO-3
replicated frozen base: same function, same gradients, same training as the unfused layer."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harness.checks import within_abs
from harness.ranks import results, run_workers
from ds_relora.models import Shape, build_model, enable_activation_checkpointing, llama_config
from ds_relora.methods.lora_layer import ReLoRALinear, wrap_model
from ds_relora.methods.dropout_gemm import draw_seed, dropout_gemm
from ds_relora.methods.lora_layer import ReLoRALinear
from ds_relora.methods.fused_input import SharedInput, link_shared_inputs, unlink_shared_inputs

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPE = Shape(hidden=48, intermediate=100, layers=2, heads=4)
VOCAB = 61


def tiny_wrapped(dropout: float, fuse: bool = True):
    model = build_model(llama_config(SHAPE, VOCAB, 32, attn_implementation="eager"), seed=0)
    wrap_model(model, rank=4, alpha=8.0, dropout=dropout, target_modules=TARGETS, seed=1, fuse_shared_inputs=fuse)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):  # non-zero B, so the adapter path shows up in outputs and grads
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def loss_and_grads(model, x, seed=0):
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(a, b, tol=1e-6):
    (la, ga), (lb, gb) = a, b
    assert torch.allclose(la, lb, atol=tol, rtol=0), (la, lb)
    assert ga.keys() == gb.keys()
    for n in ga:
        assert torch.allclose(ga[n], gb[n], atol=tol, rtol=1e-5), (n, (ga[n] - gb[n]).abs().max())


def test_groups_and_state_dict_unchanged():
    fused, plain = tiny_wrapped(0.1), tiny_wrapped(0.1, fuse=False)
    attn, mlp = fused.model.layers[0].self_attn, fused.model.layers[0].mlp
    assert attn.q_proj.shared_input is attn.k_proj.shared_input is attn.v_proj.shared_input is not None
    assert mlp.gate_proj.shared_input is mlp.up_proj.shared_input is not attn.q_proj.shared_input
    assert attn.o_proj.shared_input is None and mlp.down_proj.shared_input is None
    sd_f, sd_p = fused.state_dict(), plain.state_dict()
    assert list(sd_f) == list(sd_p) and all(sd_f[k].shape == sd_p[k].shape for k in sd_f)
    assert [n for n, _ in fused.named_parameters()] == [n for n, _ in plain.named_parameters()]


def test_fused_equals_unfused_without_dropout():
    fused = tiny_wrapped(0.0)
    plain = copy.deepcopy(fused)
    unlink_shared_inputs(plain)
    x = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    assert_same(loss_and_grads(fused, x), loss_and_grads(plain, x))


def _group(dropout):
    g = torch.Generator().manual_seed(0)
    members = [ReLoRALinear(nn.Linear(12, out), 3, 6.0, dropout, g) for out in (12, 8, 8)]
    for m in members:
        nn.init.normal_(m.lora_B, std=0.3)
    return members, SharedInput(members)


def test_one_mask_per_shared_input_matches_reference():
    """Fused: y_i = W_i x + b_i + s B_i A_i d(x) with ONE dropout d for all members (reference
    computed by hand with that mask), gradients included."""
    members, group = _group(0.25)
    for m in members:
        m.__dict__["shared_input"] = group
    x = torch.randn(2, 5, 12, requires_grad=True)
    torch.manual_seed(7)
    ys = [m(x) for m in members]
    assert group._x is None, "the cache is emptied once every member took its slice"
    sum(y.square().sum() for y in ys).backward()
    got = [x.grad.clone()] + [p.grad.clone() for m in members for p in (m.lora_A, m.lora_B)]

    x2 = x.detach().clone().requires_grad_(True)
    for m in members:
        m.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    keep = torch.empty_like(x2).bernoulli_(0.75, generator=torch.Generator().manual_seed(draw_seed()))
    xd = x2 * keep / 0.75
    refs = [F.linear(x2, m.weight, m.bias) + m.scale * F.linear(F.linear(xd, m.lora_A), m.lora_B) for m in members]
    for y, r in zip(ys, refs):
        assert torch.allclose(y, r, atol=1e-6)
    sum(r.square().sum() for r in refs).backward()
    want = [x2.grad] + [p.grad for m in members for p in (m.lora_A, m.lora_B)]
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_eval_and_no_grad_match_unfused_with_dropout():
    fused = tiny_wrapped(0.1)
    plain = copy.deepcopy(fused)
    unlink_shared_inputs(plain)
    fused.eval(), plain.eval()
    x = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(fused(input_ids=x).logits, plain(input_ids=x).logits, atol=1e-6)


def test_a_member_called_twice_or_on_another_input_recomputes():
    members, group = _group(0.0)
    for m in members:
        m.__dict__["shared_input"] = group
    x, z = torch.randn(3, 12), torch.randn(3, 12)
    q = members[0]
    ref = lambda m, t: F.linear(t, m.weight, m.bias) + m.scale * F.linear(F.linear(t, m.lora_A), m.lora_B)  # noqa: E731
    assert torch.allclose(q(x), ref(q, x), atol=1e-6)
    assert torch.allclose(q(z), ref(q, z), atol=1e-6)          # other input: miss
    assert torch.allclose(members[1](z), ref(members[1], z), atol=1e-6)
    assert torch.allclose(q(z), ref(q, z), atol=1e-6)          # q again on z: fresh, not the stale slice
    z.add_(1.0)                                                # in place: version changes, so a miss
    assert torch.allclose(members[2](z), ref(members[2], z), atol=1e-6)


def test_activation_checkpointing_recomputes_the_same_masks():
    """Non-reentrant checkpointing recomputes each layer in backward: the recompute must draw the
    same shared mask (checkpoint restores the RNG) and hit no stale cache entry."""
    base = tiny_wrapped(0.1)
    ckpt = copy.deepcopy(base)
    link_shared_inputs(ckpt, ReLoRALinear)  # deepcopy keeps the links; relinking is idempotent
    enable_activation_checkpointing(ckpt)  # what the trainer calls
    assert all(layer.gradient_checkpointing for layer in ckpt.model.layers)
    base.train(), ckpt.train()
    x = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
    assert_same(loss_and_grads(base, x, seed=5), loss_and_grads(ckpt, x, seed=5), tol=1e-5)


def _saved_bytes(model, x):
    """Bytes autograd keeps for backward, each storage once, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=x, labels=x).loss
    return sum(v for k, v in saved.items() if k not in params)


@pytest.mark.parametrize("fuse", [True, False])
def test_dropout_keeps_no_dropped_copy_for_backward(fuse):
    """With dropout an adapter saves what it saves without: the base GEMM's own input, A x and A
    (not a dropped copy and a mask per input, as autograd's dropout would)."""
    x = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(3))
    with_dropout, without = tiny_wrapped(0.1, fuse=fuse), tiny_wrapped(0.0, fuse=fuse)
    assert _saved_bytes(with_dropout, x) == _saved_bytes(without, x)
    # what autograd's own dropout would keep per token and layer: 4 (unfused 7) dropped inputs, each
    # with its mask (fp32 4 B + mask 4 B on CPU), 3 of width h and 1 of width f when fused
    h, f = SHAPE.hidden, SHAPE.intermediate
    old = tiny_wrapped(0.0, fuse=fuse)
    for _, m in old.named_modules():
        if isinstance(m, ReLoRALinear):
            m.forward = (lambda m: lambda t: F.linear(t, m.weight, m.bias)
                         + m.scale * F.linear(F.linear(F.dropout(t, 0.1), m.lora_A), m.lora_B))(m)
    assert _saved_bytes(old, x) - _saved_bytes(with_dropout, x) >= 8 * (3 * h + f) * x.numel() * SHAPE.layers


def test_dropout_gemm_matches_autograd_dropout_with_the_same_mask():
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(3, 7, 16, dtype=dtype, requires_grad=True)
        a = torch.randn(5, 16, dtype=dtype, requires_grad=True)
        u = dropout_gemm(x, a, 0.3, True, seed=11)
        g = torch.randn_like(u)
        u.backward(g)
        keep = torch.empty_like(x).bernoulli_(0.7, generator=torch.Generator().manual_seed(11))
        x2, a2 = x.detach().clone().requires_grad_(), a.detach().clone().requires_grad_()
        u2 = F.linear(x2 * keep * (1 / 0.7), a2)
        u2.backward(g)
        assert torch.equal(u, u2) and torch.equal(x.grad, x2.grad) and torch.equal(a.grad, a2.grad), dtype
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    a = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, a: dropout_gemm(x, a, 0.3, True, seed=5), (x, a))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # keep_base_fp32: fp32 params, bf16 compute
        u = dropout_gemm(x.float().detach().requires_grad_(), a.float().detach().requires_grad_(), 0.3, True, 2)
    assert u.dtype == torch.bfloat16
    plain = torch.randn(2, 6)
    assert torch.equal(dropout_gemm(plain, a.float(), 0.3, False), F.linear(plain, a.float()))


@pytest.fixture(scope="module")
def zero_runs():
    outs = run_workers(["tests/workers/fused_worker.py", "--configs",
                        "z0-fused,z3-fused,z3-replicate,z3-unfused-p0,z3-fused-p0"], 2, timeout=600)
    return {r["name"]: r for r in results(outs) if r["rank"] == 0}, results(outs)


def test_zero3_fused_trains_like_zero0_with_dropout(zero_runs):
    runs, _ = zero_runs
    ref = runs["z0-fused"]["losses"]
    assert ref[-1] < ref[0]
    assert len(runs["z3-fused"]["losses"]) == len(ref)
    # Measured exactly equal on the native (AVX2) and ATen-default kernels (2 ranks both sides;
    # benchmarks/invariance/tolerances.py, AMD EPYC): the bound is room for another CPU's GEMMs.
    assert all(within_abs(a, b, 1e-5, "fused adapters ZeRO-3 vs 0") for a, b in zip(runs["z3-fused"]["losses"], ref))


def test_zero3_fused_equals_unfused(zero_runs):
    runs, _ = zero_runs
    assert len(runs["z3-fused-p0"]["losses"]) == len(runs["z3-unfused-p0"]["losses"]) > 0
    # Measured exactly equal on the native and ATen-default kernels (tolerances.py, AMD EPYC).
    pairs = zip(runs["z3-fused-p0"]["losses"], runs["z3-unfused-p0"]["losses"])
    assert all(within_abs(a, b, 1e-6, "fused vs unfused, ZeRO-3") for a, b in pairs)


def test_zero3_replicated_base_trains_identically_and_stays_consistent(zero_runs):
    runs, every = zero_runs
    rep = [r for r in every if r["name"] == "z3-replicate"]
    assert all(r["replicated"] == 2 * 7 for r in rep), "every frozen W of both layers kept gathered"
    assert all(r["gathered_ok"] for r in rep), "gathered W and its shard agree after steps and the merge"
    assert len(runs["z3-replicate"]["losses"]) == len(runs["z3-fused"]["losses"]) > 0
    # Measured exactly equal on the native and ATen-default kernels (tolerances.py, AMD EPYC).
    pairs = zip(runs["z3-replicate"]["losses"], runs["z3-fused"]["losses"])
    assert all(within_abs(a, b, 1e-5, "replicated base vs sharded, ZeRO-3") for a, b in pairs)
