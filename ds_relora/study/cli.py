"""``ds-relora sweep`` and ``ds-relora compare`` (registered by :func:`add_study_commands`)."""

from __future__ import annotations

import json
from pathlib import Path

from ds_relora.errors import ConfigError, UserError
from ds_relora.study.sweep import POINTS_FILE, expand, load_sweep, read_points, sweep_dir, write_points


def _sweep_folder_and_runs(args) -> tuple[Path, list[Path]]:
    """The sweep folder and its points' run folders, from a sweep folder or a (prepared) sweep file."""

    target = Path(args.sweep)
    if target.is_dir():
        out = target
    else:
        spec, path = load_sweep(target, _overrides(args))
        out = sweep_dir(spec, path, args.out)
    entries = read_points(out)
    if args.only:
        entries = [e for e in entries if e["name"] in args.only]
    return out, [Path(e["run_dir"]) for e in entries]


def _overrides(args) -> list[str]:
    return [s for group in (args.set or []) for s in group]


def cmd_sweep(args) -> int:
    from ds_relora.study.runner import format_status, run_local, run_point, write_commands, write_slurm  # noqa: PLC0415  (keeps this module's import light (no torch) for the CLI's start-up)

    if args.run_point:
        return run_point(Path(args.run_point))
    if not args.sweep:
        raise UserError("ds-relora sweep needs a sweep file (or --run-point RUN_DIR)")
    if args.status:
        _, runs = _sweep_folder_and_runs(args)
        print(format_status(runs))
        return 0
    spec, path = load_sweep(args.sweep, _overrides(args))
    out = sweep_dir(spec, path, args.out)
    points = expand(spec, path, out)  # every point validated before anything is written or run
    if args.only:
        unknown = sorted(set(args.only) - {p.name for p in points})
        if unknown:
            raise ConfigError(f"--only {unknown[0]}: no such point; the points are {', '.join(p.name for p in points)}")
    launches = {(p.cfg.launch.launcher, p.cfg.launch.num_nodes, p.cfg.launch.num_gpus) for p in points}
    if args.slurm and len(launches) > 1:
        raise ConfigError("the points ask for different launch.launcher/num_nodes/num_gpus but a job array has one "
                          "resource request: split the sweep by launch settings")
    write_points(points, out, path)
    selected = [p for p in points if not args.only or p.name in args.only]
    runs = [p.run_dir for p in selected]
    commands = write_commands(runs, out)
    print(f"sweep {out}: {len(points)} point(s) validated; commands: {commands}")
    for p in selected:
        print(f"  {p.name}: method {p.method}, {p.total_steps} steps -> {p.run_dir}")
    if args.slurm:
        script = write_slurm(runs, out, spec.name or path.stem, spec.slurm, selected[0].cfg.launch, Path.cwd())
        print(f"SLURM job array ({len(runs)} tasks): sbatch {script}")
        return 0
    if args.dry_run:
        return 0
    return run_local(runs)


def cmd_compare(args) -> int:
    from ds_relora.study.compare import compare  # noqa: PLC0415  (keeps this module's import light (no torch) for the CLI's start-up)

    if args.out:
        out = Path(args.out)
    elif len(args.paths) == 1 and (Path(args.paths[0]) / POINTS_FILE).is_file():
        out = Path(args.paths[0]) / "compare"
    else:
        out = Path("compare")
    result = compare(args.paths, out, plots=not args.no_plots)
    print(result["table"])
    print("written: " + ", ".join(str(f) for f in result["files"]))
    if args.json:
        print(json.dumps(result["rows"], default=str))
    return 0


def add_study_commands(sub) -> None:
    """Register ``sweep`` and ``compare`` on the ``ds-relora`` subparsers."""
    p = sub.add_parser("sweep", help="validate, prepare and run (or submit) a grid of runs from a sweep file")
    p.add_argument("sweep", nargs="?", help="sweep YAML (or, with --status, its sweep folder)")
    p.add_argument("--set", action="append", nargs="+", metavar="KEY=VALUE",
                   help="override for every point, e.g. data.path=data/x or budget.tokens_per_param=20")
    p.add_argument("--out", help="sweep folder (default: the file's out:, else runs/sweeps/<file stem>)")
    p.add_argument("--status", action="store_true", help="show which points are done, running, failed, partial, pending")
    p.add_argument("--slurm", action="store_true", help="write a SLURM job-array script (and commands.txt) instead of running")
    p.add_argument("--dry-run", action="store_true", help="validate and write the run folders and commands.txt only")
    p.add_argument("--only", nargs="+", metavar="POINT", help="run (or show) only these points")
    p.add_argument("--run-point", metavar="RUN_DIR", help="train one prepared point to the end (what commands.txt runs)")
    p.set_defaults(fn=cmd_sweep)
    p = sub.add_parser("compare", help="table (markdown + CSV) and plots from run folders or a sweep folder")
    p.add_argument("paths", nargs="+", help="run folders and/or sweep folders (finished or not)")
    p.add_argument("--out", help="output folder (default: SWEEP/compare for one sweep folder, else ./compare)")
    p.add_argument("--no-plots", action="store_true", help="tables only")
    p.add_argument("--json", action="store_true", help="also print the grouped rows as JSON")
    p.set_defaults(fn=cmd_compare)
