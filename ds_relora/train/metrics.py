"""Rank-0 observability: progress bar, metrics.jsonl, optional TensorBoard and W&B sinks."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


class MetricsLogger:
    """Every method is a no-op on ranks other than 0, so callers need no rank checks."""

    def __init__(self, run_dir: Path, rank: int, total_steps: int, start_step: int, *,
                 tensorboard: bool = False, wandb_project: str | None = None, config: dict | None = None):
        self.active = rank == 0
        self.total = total_steps
        self.first_step = start_step
        self.started = time.time()
        self.plain_every = max(1, total_steps // 20)
        self.bar = None
        self.tb = None
        self.wandb = None
        if not self.active:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(run_dir / "metrics.jsonl", "a", buffering=1)
        from tqdm import tqdm

        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", file=sys.stderr,
                        dynamic_ncols=True, mininterval=1.0, disable=None)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"))
        if wandb_project:
            import wandb

            self.wandb = wandb.init(project=wandb_project, config=config or {}, dir=str(run_dir))

    def _write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")

    def step(self, record: dict) -> None:
        if not self.active:
            return
        record = {"type": "step", "time": time.time(), **record}
        self._write(record)
        if self.bar is not None and not self.bar.disable:
            self.bar.update(record["step"] - self.bar.n)
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                 tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
        elif record["step"] % self.plain_every == 0 or record["step"] == self.total:
            # No terminal (a log file, a batch job): a plain line every ~5% of the run instead.
            elapsed = time.time() - self.started
            done = record["step"] - self.first_step
            eta = elapsed / done * (self.total - record["step"]) if done else 0.0
            print(f"step {record['step']}/{self.total} loss {record['loss']:.4f} lr {record['lr']:.2e} "
                  f"tok/s {record['tokens_per_s']:.0f} eta {time.strftime('%H:%M:%S', time.gmtime(eta))}",
                  file=sys.stderr, flush=True)
        for key in ("loss", "lr", "tokens_per_s", "grad_norm"):
            if record.get(key) is not None:
                self._scalar(f"train/{key}", record[key], record["step"])

    def event(self, name: str, step: int, **fields) -> None:
        if not self.active:
            return
        self._write({"type": "event", "event": name, "step": step, "time": time.time(), **fields})
        if name == "eval":
            self._scalar("eval/loss", fields["loss"], step)
            self._scalar("eval/perplexity", fields["perplexity"], step)

    def info(self, message: str) -> None:
        if not self.active:
            return
        (self.bar.write if self.bar is not None else print)(message, file=sys.stderr)

    def _scalar(self, key: str, value: float, step: int) -> None:
        if self.tb is not None:
            self.tb.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log({key: value}, step=step)

    def close(self) -> None:
        if not self.active:
            return
        if self.bar is not None:
            self.bar.close()
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
