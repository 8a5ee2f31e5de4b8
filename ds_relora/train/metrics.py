"""Rank-0 observability: progress bar, metrics.jsonl, optional TensorBoard and W&B sinks.

The record schema is documented in docs/metrics.md. After a resume from step N the log holds
what the resumed run would have written had it never stopped: ``metrics.jsonl`` is cut back to
the checkpoint event of step N (then a ``resume`` event), TensorBoard purges steps > N and W&B
continues the same run (its id is kept in ``run_dir/wandb_id``).
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from pathlib import Path

from ds_relora.run_folder import metrics_file


def truncate_to_checkpoint(path: Path, step: int) -> int:
    """Cut ``metrics.jsonl`` back to the record of the checkpoint at ``step`` (records after it
    were written by the interrupted job past its last checkpoint). Returns the records dropped."""
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    keep = None
    for i, line in enumerate(lines):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by the crash
        if rec.get("event") == "checkpoint" and rec.get("step") == step:
            keep = i + 1
    if keep is None:  # no checkpoint record (log lost or older): keep what is not past the step
        kept = [ln for ln in lines if _step_of(ln) is not None and _step_of(ln) <= step]
    else:
        kept = lines[:keep]
    tmp = path.with_name(path.name + f".tmp.{os.getpid()}")
    tmp.write_text("".join(ln + "\n" for ln in kept))
    os.replace(tmp, path)
    return len(lines) - len(kept)


def _step_of(line: str) -> int | None:
    try:
        return json.loads(line).get("step")
    except json.JSONDecodeError:
        return None


class MetricsLogger:
    """Every method is a no-op on ranks other than 0, so callers need no rank checks."""

    def __init__(self, run_dir: Path, rank: int, total_steps: int, start_step: int, *,
                 tensorboard: bool = False, wandb_project: str | None = None, config: dict | None = None,
                 resumed_from: Path | None = None):
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
        resumed = resumed_from is not None
        dropped = truncate_to_checkpoint(metrics_file(run_dir), start_step) if resumed else 0
        self.file = open(metrics_file(run_dir), "a", buffering=1)
        if resumed:
            self._write({"type": "event", "event": "resume", "step": start_step, "time": time.time(),
                         "checkpoint": str(resumed_from), "dropped_records": dropped})
        from tqdm import tqdm  # noqa: PLC0415  (tqdm is needed only here)

        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", file=sys.stderr,
                        dynamic_ncols=True, mininterval=1.0, disable=None)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415  (torch takes seconds to import; this module is on the CLI's start-up path)

            # purge_step: events of the interrupted job past the checkpoint are dropped.
            self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1 if resumed else None)
        if wandb_project:
            import wandb  # noqa: PLC0415  (optional dependency: imported only where it is used)

            id_file = run_dir / "wandb_id"
            # Our own id: wandb.util.generate_id is gone from wandb >= 0.2x (the run died at start).
            run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
            id_file.write_text(run_id + "\n")
            self.wandb = wandb.init(project=wandb_project, config=config or {}, dir=str(run_dir), id=run_id,
                                    resume="allow")

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
        if not self.active or self.file.closed:
            return
        if self.bar is not None:
            self.bar.close()
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
