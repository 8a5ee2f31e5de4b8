"""``ds-relora``: prepare-data, train, eval, export, spectrum, estimate-memory, config."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from pathlib import Path

from ds_relora import __version__, rank_exits, run_lock
from ds_relora.checkpoint.meta import META, read_meta
from ds_relora.config import Method, RunConfig, TrainConfig, dump_config, load_config, resolve_config_path
from ds_relora.config_base import field_docs
from ds_relora.disk import check_free_space, check_writable, disk_error, is_disk_error
from ds_relora.errors import UserError
from ds_relora.launch.launchers import build_launch, run_plan
from ds_relora.launch.supervise import hold_stop_signals
from ds_relora.run_folder import LOCK, checkpoint_root, config_file
from ds_relora.study.cli import add_study_commands
from ds_relora.study.lm_eval import add_task_args, cmd_eval_tasks
from ds_relora.worker import main as worker_main


def _load(args):

    overrides = [s for group in (args.set or []) for s in group]
    return load_config(resolve_config_path(args.config), overrides)


def cmd_prepare(args) -> int:
    from ds_relora.data import prepare_data  # noqa: PLC0415  (keeps this module's import light (no torch) for the CLI's start-up)

    cfg = _load(args)
    budget = streaming_token_budget(cfg)
    if budget is not None:
        cfg.prepare.max_tokens = budget
        print(f"note: prepare.max_tokens is not set for the streaming source {cfg.prepare.source}: preparing this run's "
              f"token budget, {budget:,} tokens (train.total_steps x global batch x data.seq_len, plus the validation "
              "share and 2%); set prepare.max_tokens to prepare more", file=sys.stderr)
    prepare_data(cfg.prepare, args.out or cfg.data.path, overwrite=args.overwrite)
    return 0


def streaming_token_budget(cfg) -> int | None:
    """The tokens a run trains on (with its validation share and 2 % to spare), for a streaming
    hub source without ``prepare.max_tokens``: nobody tokenizes all of C4 by accident."""
    if cfg.prepare.max_tokens is not None or not str(cfg.prepare.source).startswith("hf:"):
        return None
    batch = cfg.train.global_batch_size or cfg.train.micro_batch_size * cfg.launch.num_nodes * cfg.launch.num_gpus
    train_tokens = cfg.train.total_steps * batch * cfg.data.seq_len
    return int(train_tokens / (1.0 - cfg.prepare.val_fraction) * 1.02) + 1


def cmd_train(args) -> int:
    hold_stop_signals()  # a scheduler's early warning during the checks (torch's import included) must not kill the command
    from ds_relora.checkpoint.store import write_atomic  # noqa: PLC0415  (keeps this module's import light (no torch) for the CLI's start-up)
    from ds_relora.train.plan import expected_save_bytes, plan_run  # noqa: PLC0415  (keeps this module's import light (no torch) for the CLI's start-up)

    cfg = _load(args)
    if args.resume:
        cfg.train.resume = args.resume
    world = cfg.launch.num_nodes * cfg.launch.num_gpus
    # Every check that needs no worker, the checkpoint to resume from included, before any worker starts.
    plan = plan_run(cfg, world)
    run_dir = Path(cfg.train.run_dir)
    resolved = config_file(run_dir)
    launch = build_launch(cfg.launch, ["--config", str(resolved)], strict=not args.dry_run)
    # A read-only or full run_dir fails here, in one line, not at the first checkpoint.
    check_writable(run_dir, "train.run_dir")
    warning = check_free_space(run_dir, expected_save_bytes(cfg, plan), "train.run_dir")
    if warning:
        print(warning, file=sys.stderr)
    if args.dry_run:
        print(launch.describe())
        print(f"run folder lock ({run_dir / LOCK}): {run_lock.state(run_dir)}")
        return 0
    # Before anything is written: a second run on this folder stops here, naming the first. In
    # no_ssh mode every node runs this command on the same (shared) run folder: node 0's holds
    # the lock for the run, as its rank 0 is the one that writes.
    lock = run_lock.acquire(run_dir) if not (cfg.launch.no_ssh and cfg.launch.node_rank) else None
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(resolved, dump_config(cfg))
    if lock is not None:
        launch = build_launch(cfg.launch, ["--config", str(resolved), "--run-lock", lock.token])
    if launch.in_process:
        os.environ.update(launch.env)

        try:
            return worker_main(launch.commands[-1][launch.commands[-1].index("--config"):])
        finally:
            if lock is not None:
                lock.release()
    if not (cfg.launch.no_ssh and cfg.launch.node_rank):
        rank_exits.clear(run_dir)
    try:
        return run_plan(launch, run_dir)
    finally:
        if lock is not None:
            lock.release()


def cmd_eval(args) -> int:
    from ds_relora.eval.evaluate import eval_device_and_dtype, evaluate_model, load_any_model, run_dtype  # noqa: PLC0415  (keeps this module's import light (no torch) for the CLI's start-up)

    if args.tasks:
        return cmd_eval_tasks(args)
    folder = Path(args.path)
    data, seq_len = args.data, args.seq_len
    if not folder.is_dir():
        raise UserError(f"{folder} does not exist or is not a folder: pass a checkpoints/step-N folder or an exported model folder")
    if (folder / META).is_file():
        meta = read_meta(folder)  # one line for a damaged or foreign-format meta.json
        data = data or meta.data_path
        seq_len = seq_len or meta.seq_len
    elif not (folder / "config.json").is_file():
        hint = ""
        if any(checkpoint_root(folder).glob("step-*")) or any(folder.glob("step-*")):
            hint = " (it holds step-N folders: pass one of them)"
        raise UserError(
            f"{folder} is neither a ds_relora checkpoint (no {META}) nor an exported HF model (no config.json){hint}: "
            "pass a complete checkpoints/step-N folder or a `ds-relora export` output"
        )
    if not data or not seq_len:
        raise UserError(f"eval of the exported model {folder} needs --data <prepared folder> and --seq-len N")
    device, dtype = eval_device_and_dtype(args.device, args.dtype, run_dtype(folder))
    result = evaluate_model(load_any_model(folder), data, int(seq_len), args.batch_size, args.max_batches,
                            device=device, dtype=dtype)
    print(json.dumps({**result, "device": str(device), "dtype": str(dtype).replace("torch.", "")}))
    return 0


def cmd_export(args) -> int:
    from ds_relora.checkpoint.export import export_model  # noqa: PLC0415  (keeps this module's import light (no torch) for the CLI's start-up)

    out = export_model(args.checkpoint, args.out, args.dtype, overwrite=args.overwrite)
    print(f"exported {args.checkpoint} -> {out}")
    return 0


def cmd_spectrum(args) -> int:
    from ds_relora.eval.spectrum import compute_spectrum, format_report, plot_spectrum  # noqa: PLC0415  (keeps this module's import light (no torch) for the CLI's start-up)

    spectra = compute_spectrum(Path(args.before), Path(args.after))
    print(format_report(spectra, args.threshold))
    if args.plot:
        plot_spectrum(spectra, args.plot)
        print(f"plot: {args.plot}")
    return 0


def cmd_estimate(args) -> int:
    from ds_relora.estimate.memory import estimate_memory, format_table  # noqa: PLC0415  (keeps this module's import light (no torch) for the CLI's start-up)

    est = estimate_memory(args.preset, args.method, args.rank, args.zero_stage, args.gpus, args.micro_batch,
                          args.seq_len, vocab_size=args.vocab_size, precision=args.precision,
                          keep_base_fp32=args.keep_base_fp32, activation_checkpointing=args.activation_checkpointing,
                          offload_optimizer=args.offload_optimizer, offload_params=args.offload_params,
                          zero3_frozen_base=args.zero3_frozen_base, split_vocab=args.split_vocab)
    print(format_table(est))
    if args.gpu_memory_gib:
        from ds_relora.estimate.stage_advice import format_advice, recommend_stage  # noqa: PLC0415  (keeps this module's import light (no torch) for the CLI's start-up)

        rows, pick = recommend_stage(args.gpu_memory_gib, preset=args.preset, method=args.method, rank=args.rank,
                                     num_gpus=args.gpus, micro_batch=args.micro_batch, seq_len=args.seq_len,
                                     vocab_size=args.vocab_size, precision=args.precision,
                                     keep_base_fp32=args.keep_base_fp32,
                                     activation_checkpointing=args.activation_checkpointing)
        print()
        print(format_advice(args.gpu_memory_gib, rows, pick))
    return 0


def cmd_config(args) -> int:

    if args.explain:
        for section in dataclasses.fields(RunConfig):
            cls = section.default_factory().__class__
            print(f"{section.name}:  # {section.metadata.get('doc', '')}")
            for name, text in field_docs(cls).items():
                print(f"  {name}: {text}")
        return 0
    print(dump_config(_load(args)), end="")
    return 0


def _config_args(p) -> None:
    p.add_argument("--config", help="run config YAML, or a shipped recipe name (e.g. quickstart)")
    p.add_argument("--set", action="append", nargs="+", metavar="KEY=VALUE", help="override, e.g. train.total_steps=100")


def build_parser() -> argparse.ArgumentParser:

    ap = argparse.ArgumentParser(prog="ds-relora", description="ReLoRA pre-training on DeepSpeed")
    ap.add_argument("--version", action="version", version=f"ds-relora {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare-data", help="tokenize a corpus into packed token shards")
    _config_args(p)
    p.add_argument("--out", help="output folder (default: data.path)")
    p.add_argument("--overwrite", action="store_true", help="replace a previous prepare-data output in that folder")
    p.set_defaults(fn=cmd_prepare)
    p = sub.add_parser("train", help="launch training (validates everything first)")
    _config_args(p)
    p.add_argument("--resume", help="'auto' or a checkpoint folder")
    p.add_argument("--dry-run", action="store_true", help="validate and print the launch commands only")
    p.set_defaults(fn=cmd_train)
    p = sub.add_parser("eval", help="validation loss/perplexity of a checkpoint or exported model")
    p.add_argument("path", help="checkpoints/step-N folder or exported model folder")
    p.add_argument("--data", help="prepared data folder (default: the checkpoint's)")
    p.add_argument("--seq-len", type=int)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-batches", type=int)
    p.add_argument("--device", default="auto",
                   help="auto (default: CUDA when available, else CPU), cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="autocast dtype of the forward; auto: the run's precision on CUDA, float32 on the CPU")
    add_task_args(p)
    p.set_defaults(fn=cmd_eval)
    p = sub.add_parser("export", help="write a merged HF model (safetensors) from a checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out even when it is a non-empty folder that is not a previous export")
    p.set_defaults(fn=cmd_export)
    p = sub.add_parser("spectrum", help="singular values of the learned update between two checkpoints")
    p.add_argument("before")
    p.add_argument("after")
    p.add_argument("--threshold", type=float, default=0.1)
    p.add_argument("--plot", help="PNG file for the spectra")
    p.set_defaults(fn=cmd_spectrum)
    p = sub.add_parser("estimate-memory", help="analytic per-GPU memory planner")
    p.add_argument("--preset", default="1.3b")
    # The schema's names, not the registry's: importing methods/ would load torch for --help
    # (tests/test_methods_math.py holds the two lists equal).
    p.add_argument("--method", default=TrainConfig().method, choices=list(typing.get_args(Method)))
    p.add_argument("--rank", type=int, default=None, help="adapter / projection rank (default: the method's own, 128 for most)")
    p.add_argument("--zero-stage", type=int, default=2, choices=[0, 1, 2, 3])
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--keep-base-fp32", action="store_true")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--offload-optimizer", action="store_true")
    p.add_argument("--offload-params", action="store_true")
    p.add_argument("--zero3-frozen-base", default="partition", choices=["partition", "replicate"],
                   help="ZeRO-3: frozen W partitioned (default) or replicated on every GPU")
    p.add_argument("--split-vocab", action="store_true",
                   help="the embedding and head in row blocks (model.split_vocab): transients bounded by a decoder layer")
    p.add_argument("--gpu-memory-gib", type=float, help="also recommend the fastest ZeRO setting that fits this much per GPU")
    p.set_defaults(fn=cmd_estimate)
    p = sub.add_parser("config", help="print the resolved config, or every field's help (--explain)")
    _config_args(p)
    p.add_argument("--explain", action="store_true")
    p.set_defaults(fn=cmd_config)
    add_study_commands(sub)
    return ap


# Where each command writes, for a disk error's fix.
_WRITES_TO = {"prepare-data": "--out (or data.path)", "train": "train.run_dir", "export": "--out"}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args) or 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if not is_disk_error(exc):
            raise
        print(f"error: {disk_error(exc, setting=_WRITES_TO.get(args.command, 'the output folder'))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
