"""Optimizer step time of APOLLO / APOLLO-Mini / Fira vs AdamW at one decoder layer's shape, and
the projection's all-reduce bytes per step next to the analytic figure.

One layer's seven target matrices (1.3B: q, k, v, o 2048x2048; gate, up 5461x2048 tall; down
2048x5461 wide) with random gradients. Per optimizer: --warmup untimed steps, then the median
of --steps timed ``step()`` calls, side by side in one process:

* ``adamw``: torch's AdamW (its default CPU implementation, as the engine builds it on CPU);
* ``apollo`` (random projection, channel scaling, rank --rank), ``apollo_mini`` (rank 1,
  tensor scaling), ``fira`` (SVD projector, residual) through ``zero/projected_adam.py`` on the
  whole matrices (ZeRO-0). The projector is renewed every --gap steps; the timed window covers
  whole gaps so renewals (an SVD for Fira) are in the median's neighbourhood, not hidden.

With --nprocs N > 1 the same matrices are cut into N contiguous equal element ranges of their
concatenation (the ZeRO-1/2 layout), each rank steps its range, and rank 0 reports the bytes of
the step's projection all-reduce (``ProjectedAdamW.last_reduce_bytes``) next to the analytic
``4 (r x rows cut between ranks of tall matrices + r x n per wide matrix)``.

    python benchmarks/throughput/projected_step.py                     # 1.3B layer, 1 process
    python benchmarks/throughput/projected_step.py --nprocs 2 --steps 4  # + all-reduce bytes
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.common import emit, init_distributed, launch_ranks, say  # noqa: E402


def _matrices(hidden: int, inter: int):
    import torch

    g = torch.Generator().manual_seed(0)
    shapes = [(hidden, hidden)] * 4 + [(inter, hidden)] * 2 + [(hidden, inter)]
    return [torch.nn.Parameter(torch.randn(s, generator=g) * 0.02) for s in shapes]


def _time(opt, params, steps: int, warmup: int) -> float:
    import torch

    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(p.shape, generator=g) * 1e-3 for p in params]
    times = []
    for i in range(warmup + steps):
        for p, gr in zip(params, grads):
            p.grad = gr
        started = time.perf_counter()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def _options(kind: str, rank: int, gap: int) -> dict:
    common = {"update_proj_gap": gap, "limiter": True}
    return {"apollo": {"proj_rank": rank, "proj_kind": "random", "scale_type": "channel", "proj_scale": 1.0,
                       "residual": False, **common},
            "apollo_mini": {"proj_rank": 1, "proj_kind": "random", "scale_type": "tensor", "proj_scale": 128.0,
                            "residual": False, **common},
            "fira": {"proj_rank": rank, "proj_kind": "svd", "scale_type": "channel", "proj_scale": 1.0,
                     "residual": True, **common}}[kind]


def single(args) -> None:
    import torch

    from ds_relora.zero.projected_adam import ProjectedAdamW

    torch.set_num_threads(args.threads)
    rows = []
    for kind in ["adamw", *args.methods.split(",")]:
        params = _matrices(args.hidden, args.inter)
        if kind == "adamw":
            opt = torch.optim.AdamW(params, lr=1e-3)
        else:
            opt = ProjectedAdamW([{"params": params, **_options(kind, args.rank, args.gap)}], lr=1e-3)
        rows.append((kind, _time(opt, params, args.steps, args.warmup)))
    rows.append((f"(r={args.rank} GEMMs)", _gemm_floor(args)))
    base = rows[0][1]
    print(f"one {args.hidden}x{args.inter} layer (7 matrices), {args.threads} thread(s), median of {args.steps} steps")
    for kind, t in rows:
        print(f"  {kind:18s} {t * 1e3:8.1f} ms   {t / base:5.2f}x adamw")
    print("  (r=... GEMMs): the projections R = G P^T / P^T G alone, the floor of any exact rank-r APOLLO step")


def _gemm_floor(args) -> float:
    """Median time of the layer's seven projection GEMMs alone (2 m n r flops each)."""
    import torch

    params = _matrices(args.hidden, args.inter)
    projs = [torch.randn(args.rank, p.shape[1]) if p.shape[0] >= p.shape[1] else torch.randn(p.shape[0], args.rank)
             for p in params]
    times = []
    for i in range(args.warmup + args.steps):
        started = time.perf_counter()
        for p, proj in zip(params, projs):
            _ = p.data @ proj.t() if p.shape[0] >= p.shape[1] else proj.t() @ p.data
        if i >= args.warmup:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def worker(args) -> None:
    import torch

    from ds_relora.zero.projected_adam import ProjectedAdamW
    from ds_relora.zero.projected_layout import Segment, split_rows

    rank, world = init_distributed()
    for kind in args.methods.split(","):
        params = _matrices(args.hidden, args.inter)
        opt = ProjectedAdamW([{"params": params, **_options(kind, args.rank, args.gap)}], lr=1e-3)
        total = sum(p.numel() for p in params)
        size = -(-total // world)
        lo, hi = rank * size, min(total, rank * size + size)
        flat = torch.zeros(hi - lo)
        segs, at = [], 0
        for m, p in zip(opt.matrices, params):
            a, b = max(lo, at), min(hi, at + p.numel())
            m.ranges = [(min(max(k * size - at, 0), p.numel()), min(max(k * size + size - at, 0), p.numel()))
                        for k in range(world)]
            m.split_rows = split_rows(m.ranges, m.shape[1]) if m.tall else []
            m.unit = ("flat", 0)
            if b > a:
                segs.append(Segment(a - lo, b - a, a - at, p, m))
            at += p.numel()
        opt.param_groups[0]["params"] = [flat]
        opt.attach({id(flat): (("flat", 0), segs)}, partitioned=True, comm_device=torch.device("cpu"),
                   devices={("flat", 0): flat.device})
        flat.grad = torch.randn(flat.shape, generator=torch.Generator().manual_seed(rank)) * 1e-3
        started = time.perf_counter()
        for _ in range(args.steps):
            opt.step()
        elapsed = (time.perf_counter() - started) / args.steps
        r = opt.matrices[0].group["proj_rank"]
        analytic = 4 * sum(r * len(m.split_rows) if m.tall else r * m.shape[1] for m in opt.matrices)
        if rank == 0:
            say(f"{kind}: {world} ranks, step {elapsed * 1e3:.1f} ms, projection all-reduce "
                f"{opt.last_reduce_bytes} bytes/step, analytic {analytic}")
            emit({"method": kind, "world": world, "reduce_bytes": opt.last_reduce_bytes, "analytic": analytic,
                  "step_s": elapsed})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=5461)
    ap.add_argument("--rank", type=int, default=256)
    ap.add_argument("--gap", type=int, default=200)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", default="apollo,apollo_mini")
    ap.add_argument("--nprocs", type=int, default=1)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
    elif args.nprocs > 1:
        forwarded = [a for a in sys.argv[1:]]
        for rec in launch_ranks(Path(__file__), [*forwarded, "--worker"], args.nprocs):
            print(f"  {rec['method']:12s} {rec['world']} ranks: all-reduce {rec['reduce_bytes']} B/step "
                  f"(analytic {rec['analytic']} B), step {rec['step_s'] * 1e3:.1f} ms")
    else:
        single(args)


if __name__ == "__main__":
    main()
