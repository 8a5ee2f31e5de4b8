"""``ds-relora eval PATH --tasks ...``: EleutherAI's lm-evaluation-harness on a checkpoint or an
export (optional extra: ``pip install 'ds_relora[eval]'``).

The model is loaded the way ``ds-relora eval`` loads it (a checkpoint's adapters merged into W,
fp32) and handed to ``lm_eval.models.huggingface.HFLM`` as an already built model with the
folder's own tokenizer, then ``lm_eval.simple_evaluate`` runs the tasks. Tasks are lm-eval task
names, or local task YAML files / folders given with ``--include-path`` (e.g. ``dataset_path:
json`` with ``dataset_kwargs: {data_files: {test: file.jsonl}}``: no download needed). The
built-in task index is only scanned when a task is not found locally (that scan takes ~20 s).

Scores are merged into ``PATH/lm_eval.json`` (a checkpoint's own folder), where ``compare``
finds them for the run's latest checkpoint.
"""

from __future__ import annotations

import datetime
import difflib
import importlib.util
import json
import math
from pathlib import Path

from ds_relora.errors import UserError
from ds_relora.run_folder import checkpoint_root

RESULTS_FILE = "lm_eval.json"
INSTALL_HINT = "pip install 'ds_relora[eval]' (lm-eval and accelerate)"


def available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("lm_eval", "accelerate"))


def _tokenizer_dir(folder: Path) -> Path:
    for candidate in (folder / "tokenizer", folder):
        if (candidate / "tokenizer.json").is_file() or (candidate / "tokenizer_config.json").is_file():
            return candidate
    raise UserError(f"{folder} has no tokenizer (tokenizer/ or tokenizer.json): evaluate a ds_relora checkpoint "
                    "or an export written by ds-relora export")


def _task_manager(tasks: list[str], include_path: list[str] | None):
    from lm_eval.tasks import TaskManager  # noqa: PLC0415  (optional dependency: imported only where it is used)

    paths = [str(Path(p).resolve()) for p in include_path or []]
    for p in paths:
        if not Path(p).exists():
            raise UserError(f"--include-path {p} does not exist: pass a task YAML file or a folder of them")

    def known(tm) -> set[str]:
        return set(tm.all_tasks) | set(tm.all_groups) | set(tm.all_tags)

    if paths:
        tm = TaskManager(include_path=paths, include_defaults=False)
        if all(t in known(tm) for t in tasks):
            return tm
    tm = TaskManager(include_path=paths or None)
    names = known(tm)
    for t in tasks:
        if t not in names:
            hint = difflib.get_close_matches(t, sorted(names), n=1)
            raise UserError(f"lm-eval task '{t}' is unknown" + (f" (did you mean '{hint[0]}'?)" if hint else "")
                            + ": pass a task name or its YAML folder with --include-path")
    return tm


def flatten_scores(results: dict) -> dict[str, float]:
    """``{"task/metric": value}`` from lm-eval's ``results`` (``acc,none`` -> ``acc``; stderr dropped)."""
    out = {}
    for task, metrics in (results or {}).items():
        for key, value in (metrics or {}).items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or "_stderr" in key:
                continue
            if key in ("sample_len",) or not math.isfinite(value):
                continue
            metric, _, filt = key.partition(",")
            out[f"{task}/{metric}" + (f"[{filt}]" if filt and filt != "none" else "")] = float(value)
    return out


def run_tasks(path: str | Path, tasks: list[str], *, include_path: list[str] | None = None, limit: float | None = None,
              num_fewshot: int | None = None, batch_size: int = 8, device: str | None = None) -> dict:
    """Evaluate ``path`` on ``tasks``; merges the scores into ``path/lm_eval.json`` and returns them."""
    if not available():
        raise UserError(f"ds-relora eval --tasks needs lm-evaluation-harness: {INSTALL_HINT}")
    if not tasks:
        raise UserError("--tasks is empty: name at least one lm-eval task")
    folder = Path(path)
    tokenizer_dir = _tokenizer_dir(folder)
    tm = _task_manager(tasks, include_path)
    import torch  # noqa: PLC0415  (torch takes seconds to import; this module is on the CLI's start-up path)
    from lm_eval import simple_evaluate  # noqa: PLC0415  (optional dependency: imported only where it is used)
    from lm_eval.models.huggingface import HFLM  # noqa: PLC0415  (optional dependency: imported only where it is used)
    from transformers import AutoTokenizer  # noqa: PLC0415  (transformers takes seconds to import; only code that builds a model needs it)

    from ds_relora.eval.evaluate import load_any_model  # noqa: PLC0415  (keeps this module's import light (no torch) for the CLI's start-up)

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_any_model(folder).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    lm = HFLM(pretrained=model, tokenizer=tokenizer, device=device, batch_size=batch_size,
              max_length=getattr(model.config, "max_position_embeddings", None))
    result = simple_evaluate(model=lm, tasks=list(tasks), task_manager=tm, limit=limit, num_fewshot=num_fewshot,
                             log_samples=False, bootstrap_iters=0)
    scores = flatten_scores(result.get("results", {}))
    record = _read(folder / RESULTS_FILE)
    record.setdefault("tasks", {}).update({t: result["results"].get(t, {}) for t in result.get("results", {})})
    record["scores"] = {**record.get("scores", {}), **scores}
    record["runs"] = [*record.get("runs", []), {
        "tasks": list(tasks), "limit": limit, "num_fewshot": num_fewshot, "lm_eval_version": result.get("lm_eval_version"),
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "n_samples": result.get("n-samples")}]
    from ds_relora.checkpoint.store import write_atomic  # noqa: PLC0415  (keeps this module's import light (no torch) for the CLI's start-up)

    write_atomic(folder / RESULTS_FILE, json.dumps(record, indent=2, default=str))
    return {"path": str(folder), "scores": scores, "results": result.get("results", {})}


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def read_task_scores(run_dir: Path) -> dict[str, float]:
    """Scores of the newest checkpoint of ``run_dir`` that has lm-eval results (else the run folder's own)."""
    from ds_relora.checkpoint.choose import complete_checkpoints  # noqa: PLC0415  (keeps this module's import light (no torch) for the CLI's start-up)

    for _, folder in reversed(complete_checkpoints(checkpoint_root(run_dir))):
        if (folder / RESULTS_FILE).is_file():
            return dict(_read(folder / RESULTS_FILE).get("scores", {}))
    return dict(_read(Path(run_dir) / RESULTS_FILE).get("scores", {}))


def add_task_args(p) -> None:
    """The ``--tasks`` options of ``ds-relora eval``."""
    p.add_argument("--tasks", help="comma list of lm-evaluation-harness tasks (runs lm-eval instead of perplexity)")
    p.add_argument("--include-path", action="append", help="task YAML file or folder of local lm-eval tasks (repeatable)")
    p.add_argument("--limit", type=float, help="lm-eval: documents per task (or a fraction)")
    p.add_argument("--num-fewshot", type=int, help="lm-eval: few-shot examples")


def cmd_eval_tasks(args) -> int:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    out = run_tasks(args.path, tasks, include_path=args.include_path, limit=args.limit, num_fewshot=args.num_fewshot,
                    batch_size=args.batch_size)
    print(json.dumps(out["scores"]))
    print(f"lm-eval results: {Path(args.path) / RESULTS_FILE}")
    return 0
