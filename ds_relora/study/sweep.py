"""Sweep files: a base run config and a grid of overrides, expanded into validated run points.

A sweep file (YAML) is read into :class:`SweepSpec`. Every point of the grid (methods x grid
axes x per-method axes) becomes one ``RunConfig`` with its own ``train.run_dir`` under the sweep
folder; token budgets and run fractions (warm start, cycles, warm-ups) are resolved per point,
and every point passes ``plan_run`` (the same checks as ``ds-relora train``) before anything
runs. Keys under ``budget.`` and ``derive.`` in ``set``/``grid`` address this file's own
sections, every other dotted key a run config field::

    base: quickstart                 # YAML path (relative to this file) or recipe name
    config: {data: {path: data/x}}   # sections merged over base
    set: {train.eval_every: 50}      # dotted overrides for every point
    grid: {model.preset: [tiny, 9m], train.seed: [0, 1, 2]}
    methods:
      full:   {set: {train.method: full, optim.lr: 2.0e-3}}
      relora: {set: {train.method: relora, relora.lr: 8.0e-3}, grid: {relora.rank: [16, 32]}}
    budget: {tokens_per_param: 20}
    derive: {warm_start_fraction: 0.25, cycles: 5, warmup_fraction: 0.05}
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from pathlib import Path
from typing import Any, Optional

import yaml

from ds_relora.config import RunConfig, dump_config, resolve_config_path, to_dict
from ds_relora.config_base import doc, from_dict
from ds_relora.errors import ConfigError, UserError
from ds_relora.launch.launchers import build_launch
from ds_relora.run_folder import config_file, is_started
from ds_relora.study.budgets import BudgetSpec, DeriveSpec, apply_budget, apply_derive

# Run-control fields: they change how a point is run, not what it trains, so changing them
# between two sweep invocations does not make an existing run folder stale.
RUN_CONTROL_KEYS = ("train.resume", "train.stop_after_steps", "train.run_dir", "launch.master_port")
SPEC_SECTIONS = ("budget", "derive")
POINT_FILE = "sweep_point.json"
POINTS_FILE = "points.json"


@dataclasses.dataclass
class MethodSpec:
    """One named method variant (a row label of the comparison)."""

    set: dict = doc(help="dotted overrides of this method (train.method, its peak LR, ablation switches, derive.* fractions)", factory=dict)
    grid: dict = doc(help="axes only this method has (e.g. its own LR grid): dotted key -> list of values", factory=dict)


@dataclasses.dataclass
class SlurmSpec:
    """``--slurm``: resources of the job array (one request for every point)."""

    partition: Optional[str] = doc(None, "#SBATCH --partition")
    account: Optional[str] = doc(None, "#SBATCH --account")
    time: str = doc("24:00:00", "#SBATCH --time of one point")
    gpus_per_node: Optional[int] = doc(None, "#SBATCH --gpus-per-node (default launch.num_gpus; 0 omits it)")
    cpus_per_task: Optional[int] = doc(None, "#SBATCH --cpus-per-task")
    max_parallel: Optional[int] = doc(None, "points running at once (--array=0-N%max_parallel)")
    extra: list[str] = doc(help="further sbatch options, e.g. ['--exclusive', '--qos=high']", factory=list)
    setup: list[str] = doc(help="shell lines run before the point, e.g. 'source .venv/bin/activate'", factory=list)


@dataclasses.dataclass
class SweepSpec:
    """A sweep file."""

    base: Optional[str] = doc(None, "run config YAML (relative to the sweep file) or shipped recipe name; null: defaults")
    config: dict = doc(help="config sections merged over base (same layout as a run config)", factory=dict)
    set: dict = doc(help="dotted overrides applied to every point", factory=dict)
    grid: dict = doc(help="axes of the grid: dotted key -> list of values (cartesian product)", factory=dict)
    methods: dict = doc(help="method name -> {set, grid}; one more axis; empty: a single unnamed method from the config", factory=dict)
    budget: BudgetSpec = doc(help="token budget per point", factory=BudgetSpec)
    derive: DeriveSpec = doc(help="settings as fractions of each point's run", factory=DeriveSpec)
    out: Optional[str] = doc(None, "sweep folder (one sub-folder per point); default runs/sweeps/<file stem>")
    name: Optional[str] = doc(None, "sweep name (SLURM job name); default the file stem")
    slurm: SlurmSpec = doc(help="--slurm job-array settings", factory=SlurmSpec)


@dataclasses.dataclass
class Point:
    """One resolved, validated run of the sweep."""

    name: str
    method: str
    values: dict            # the grid values that make this point (dotted key -> value)
    cfg: RunConfig
    world_size: int
    run_dir: Path

    @property
    def total_steps(self) -> int:
        return self.cfg.train.total_steps


# ----------------------------------------------------------------------------- reading
def load_sweep(path: str | Path, overrides: list[str] | None = None) -> tuple[SweepSpec, Path]:
    """Read a sweep file; ``overrides`` are ``key=value`` strings added to its ``set``."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"sweep file {p} does not exist: pass a sweep YAML (see benchmarks/quality/sweep_cpu.yaml)")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"sweep file {p} is not valid YAML ({str(exc).splitlines()[0]}): fix the syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(f"sweep file {p} must hold a mapping (base:, grid:, methods:, ...)")
    spec = from_dict(SweepSpec, data, "sweep")
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' has no '=': write it as --set section.key=value")
        key, raw = item.split("=", 1)
        spec.set[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    for key, values in spec.grid.items():
        _check_axis(f"sweep.grid.{key}", values)
    for name, method in list(spec.methods.items()):
        spec.methods[name] = m = from_dict(MethodSpec, method or {}, f"sweep.methods.{name}")
        for key, values in m.grid.items():
            _check_axis(f"sweep.methods.{name}.grid.{key}", values)
    return spec, p


def _check_axis(where: str, values: Any) -> None:
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}: a grid axis needs a non-empty list of values, got {values!r}")


def sweep_dir(spec: SweepSpec, path: Path, out: str | None = None) -> Path:
    return Path(out or spec.out or Path("runs") / "sweeps" / path.stem)


def _base_dict(spec: SweepSpec, path: Path) -> dict:

    data: dict = {}
    if spec.base:
        local = path.parent / spec.base
        name = str(local) if local.is_file() else resolve_config_path(spec.base)
        if not Path(name).is_file():
            raise ConfigError(f"sweep.base={spec.base}: no such config file next to {path} and no such recipe")
        data = yaml.safe_load(Path(name).read_text()) or {}
    return _deep_merge(data, spec.config)


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in (extra or {}).items():
        out[key] = _deep_merge(out.get(key) or {}, value) if isinstance(value, dict) and key != "overrides" else value
    return out


def _set_dotted(data: dict, key: str, value: Any) -> None:
    parts = [p for p in key.split(".") if p]
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            if child is not None:
                raise ConfigError(f"override '{key}': '{part}' is a value, not a section")
            child = {}
        node[part] = child = dict(child)
        node = child
    node[parts[-1]] = value


# ----------------------------------------------------------------------------- expansion
def _axes(spec: SweepSpec) -> list[tuple[str, dict, dict]]:
    """(method name, method overrides, grid values) for every point, methods outermost."""
    methods = spec.methods or {"": MethodSpec()}
    out = []
    for name, method in methods.items():
        axes = {**spec.grid, **method.grid}
        keys = list(axes)
        for combo in itertools.product(*(axes[k] for k in keys)):
            out.append((name, dict(method.set), dict(zip(keys, combo))))
    return out


def _point_name(method: str, values: dict, varying: set[str]) -> str:
    parts = [method] if method else []
    for key, value in values.items():
        if key in varying:
            parts.append(f"{key.rsplit('.', 1)[-1]}{value}")
    name = "_".join(parts) or "run"
    return re.sub(r"[^A-Za-z0-9._+-]", "-", name)


def expand(spec: SweepSpec, path: Path, out: Path) -> list[Point]:
    """Every point of the sweep, resolved and validated; raises one ConfigError naming the point."""
    base = _base_dict(spec, path)
    combos = _axes(spec)
    seen: dict[str, set] = {}
    for _, _, values in combos:
        for k, v in values.items():
            seen.setdefault(k, set()).add(json.dumps(v, sort_keys=True))
    varying = {k for k, vs in seen.items() if len(vs) > 1}
    points, names = [], set()
    for method, method_set, values in combos:
        name = _point_name(method, values, varying)
        if name in names:
            raise ConfigError(f"sweep points share the folder name '{name}': give the methods distinct names")
        names.add(name)
        try:
            points.append(resolve_point(spec, base, name, method, method_set, values, out / name))
        except UserError as exc:
            raise ConfigError(f"sweep point {name}: {exc}") from None
    if not points:
        raise ConfigError("the sweep has no points: add methods or grid axes")
    return points


def resolve_point(spec: SweepSpec, base: dict, name: str, method: str, method_set: dict, values: dict,
                  run_dir: Path) -> Point:
    data = json.loads(json.dumps(base))
    own = {"budget": to_dict(spec.budget), "derive": to_dict(spec.derive)}
    for key, value in [*spec.set.items(), *method_set.items(), *values.items()]:
        target = own if key.split(".", 1)[0] in SPEC_SECTIONS else data
        _set_dotted(target, key, value)
    budget = from_dict(BudgetSpec, own["budget"], "budget")
    derive = from_dict(DeriveSpec, own["derive"], "derive")
    cfg = from_dict(RunConfig, data)
    cfg.train.run_dir = str(run_dir)
    cfg.train.resume = "auto"
    world = cfg.launch.num_nodes * cfg.launch.num_gpus
    apply_budget(cfg, budget, world)
    apply_derive(cfg, derive)
    validate(cfg, world)
    return Point(name, method or cfg.train.method, values, cfg, world, run_dir)


def validate(cfg: RunConfig, world: int) -> None:
    """``ds-relora train``'s checks before it launches: its one ``plan_run`` (the config, data,
    model and the checkpoint the point would resume from) and its launch command."""
    from ds_relora.train.plan import plan_run  # noqa: PLC0415  (keeps this module's import light (no torch) for the CLI's start-up)

    plan_run(cfg, world)
    build_launch(cfg.launch, ["--config", str(config_file(cfg.train.run_dir))], strict=False)


# ----------------------------------------------------------------------------- folders
def comparable(cfg_dict: dict) -> dict:
    """A resolved config without its run-control fields."""
    out = json.loads(json.dumps(cfg_dict))
    for key in RUN_CONTROL_KEYS:
        section, name = key.split(".")
        out.get(section, {}).pop(name, None)
    return out


def first_difference(a: Any, b: Any, where: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            found = first_difference(a.get(key), b.get(key), f"{where}.{key}" if where else key)
            if found:
                return found
        return None
    return None if a == b else f"{where}: {a!r} -> {b!r}"


def write_points(points: list[Point], out: Path, spec_path: Path) -> None:
    """One folder per point with its resolved config; refuses to overwrite a started run whose
    config changed (its checkpoints and metrics belong to the old config)."""
    from ds_relora.checkpoint.store import write_atomic  # noqa: PLC0415  (keeps this module's import light (no torch) for the CLI's start-up)

    for p in points:
        resolved = config_file(p.run_dir)
        if resolved.is_file() and _started(p.run_dir):
            old = yaml.safe_load(resolved.read_text()) or {}
            try:  # fields added to ds_relora since the run started compare at their defaults
                old = to_dict(from_dict(RunConfig, old))
            except UserError:
                pass
            old = comparable(old)
            diff = first_difference(old, comparable(to_dict(p.cfg)))
            if diff:
                raise ConfigError(f"sweep point {p.name}: {p.run_dir} was started with another config ({diff}): "
                                  f"restore the sweep file, or delete {p.run_dir} to rerun it")
    out.mkdir(parents=True, exist_ok=True)
    for p in points:
        p.run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(config_file(p.run_dir), dump_config(p.cfg))
        info = {"name": p.name, "method": p.method, "values": p.values, "sweep": str(spec_path),
                "total_steps": p.total_steps, "world_size": p.world_size}
        write_atomic(p.run_dir / POINT_FILE, json.dumps(info, indent=2))
    index = [{"name": p.name, "method": p.method, "run_dir": str(p.run_dir), "total_steps": p.total_steps}
             for p in points]
    write_atomic(out / POINTS_FILE, json.dumps(index, indent=2))


def _started(run_dir: Path) -> bool:
    return is_started(run_dir)


def read_points(out: Path) -> list[dict]:
    """The point index a sweep wrote (``points.json``)."""
    index = Path(out) / POINTS_FILE
    if not index.is_file():
        raise ConfigError(f"{out} has no {POINTS_FILE}: it is not a sweep folder (run ds-relora sweep FILE first)")
    return json.loads(index.read_text())
