"""The one owner of the checkpoint folder format: names, ``meta.json`` (its typed record and
its one reader are in :mod:`ds_relora.checkpoint.meta`), ``format_version``, durability (fsync)
and verification, and the one reader of its tensor sets (``open_weights``, ``open_moments``:
HF's sharded safetensors layout, :mod:`ds_relora.tensor_files`) and of its HF config
(``hf_config_file``).

A checkpoint is ``checkpoints/step-N/``. It is complete when its ``meta.json`` exists, parses,
has this ``format_version`` and its ``files`` manifest (size and a hash of every other file)
matches the folder. Format 4 hashes each *whole* file (xxh3-128), computed while the file is
written (:class:`HashingFile`, :class:`~ds_relora.tensor_files.StreamingWriter`): a byte flipped
in the middle of a 10 GB shard is caught without the save reading anything back. Formats 2-3
hashed the size and the first and last 4 MiB; they are still verified that way. ``meta.json`` is written last, after every file of the folder (written by
any rank) and the folder itself were fsynced, so a crash never leaves a ``meta.json`` that
points at unwritten data.

Saves go to ``step-N.saving`` and are renamed to ``step-N`` once complete; rewriting an existing
``step-N`` first renames it to ``step-N.replaced`` and deletes it only after the new one is in
place. A crash between the two renames leaves two complete folders under other names, which
:func:`best_folder_per_step` still finds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path

from ds_relora.checkpoint.meta import (  # noqa: F401  (the format's names, re-exported)
    FORMAT_VERSION,
    META,
    RESUMABLE_VERSIONS,
    SETS_ONLY_VERSION,
    WEIGHTS_READABLE_VERSIONS,
    CheckpointMeta,
    read_meta,
)
from ds_relora.durable import WHOLE_HASH, HashingFile, fsync_dir, fsync_tree, public_mode, whole_file_hash, write_atomic  # noqa: F401  (re-exported for the checkpoint's writers)
from ds_relora.errors import CheckpointError

# Every parameter by its HF name in fp32 (the optimizer's masters of the trainable ones, frozen W,
# adapters and adapter buffers): ``model-0000k-of-0000n.safetensors`` + its index, with
# ``config.json`` beside it, so ``transformers`` loads the folder as it is.
WEIGHTS = "model"
HF_CONFIG = "config.json"
# The Adam moments of every trainable param as whole tensors, by ``<param>.exp_avg`` /
# ``<param>.exp_avg_sq``: with the weights a stage- and world-size-independent optimizer state,
# so a run resumes on another number of ranks or another ZeRO stage.
MOMENTS_SET = "optimizer"
# Formats 1-2: one file each, and the HF config under another name.
CONSOLIDATED, OPTIMIZER_FP32, LEGACY_HF_CONFIG = "model_fp32.safetensors", "optimizer_fp32.safetensors", "hf_config.json"
STAGING, REPLACED = ".saving", ".replaced"
STEP_FOLDER = re.compile(r"^step-(\d+)(\.saving|\.replaced)?$")
_HASH_ENDS = 4 << 20  # formats 2-3: bytes hashed at each end of a file


# ----------------------------------------------------------------------------- the tensors
def open_weights(folder: str | Path):
    """Every saved parameter and adapter buffer of a checkpoint (or an export's weights), read
    per tensor: the sharded set of format 3, the single file of formats 1-2, HF's own layouts."""
    from ds_relora.tensor_files import TensorSet  # noqa: PLC0415  (keeps this module's import light (no torch) for the CLI's start-up)

    return TensorSet(folder, WEIGHTS, legacy=CONSOLIDATED)


def has_moments(folder: str | Path) -> bool:
    from ds_relora.tensor_files import index_name  # noqa: PLC0415  (keeps this module's import light (no torch) for the CLI's start-up)

    folder = Path(folder)
    return (folder / index_name(MOMENTS_SET)).is_file() or (folder / OPTIMIZER_FP32).is_file()


def open_moments(folder: str | Path):
    """The Adam moments of a checkpoint's trainable params, read per tensor."""
    from ds_relora.tensor_files import TensorSet  # noqa: PLC0415  (keeps this module's import light (no torch) for the CLI's start-up)

    return TensorSet(folder, MOMENTS_SET, legacy=OPTIMIZER_FP32)


def hf_config_file(folder: str | Path) -> Path:
    """The checkpoint's HF model config (``config.json``; ``hf_config.json`` before format 3)."""
    folder = Path(folder)
    path = folder / HF_CONFIG
    if not path.is_file() and (folder / LEGACY_HF_CONFIG).is_file():
        path = folder / LEGACY_HF_CONFIG
    if not path.is_file():
        raise CheckpointError(f"{folder} has no {HF_CONFIG}: it was not written by ds-relora train")
    return path


def file_digest(path: Path) -> str:
    """Formats 2-3: sha256 of the size and of the first and last 4 MiB (the whole file when smaller)."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(_HASH_ENDS))
        if size > 2 * _HASH_ENDS:
            f.seek(size - _HASH_ENDS)
        h.update(f.read(_HASH_ENDS))
    return h.hexdigest()


def file_manifest(folder: Path, streamed: dict[str, dict] | None = None) -> dict[str, dict]:
    """{relative path: {size, xxh3_128}} of every file under ``folder`` but ``meta.json``. The
    hashes in ``streamed`` (taken while the files were written, by whichever rank wrote them) are
    used as they are; only the files written without one (configs, indexes, tokenizer: small) are
    read here."""
    folder = Path(folder)
    streamed = streamed or {}
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel == META:
            continue
        size = path.stat().st_size
        # A streamed record whose size disagrees with the disk keeps its own size: verification
        # then reports the file as damaged instead of a manifest that blesses what is there.
        out[rel] = streamed.get(rel) or {"size": size, WHOLE_HASH: whole_file_hash(path)}
    return out


def write_meta(folder: Path, meta: CheckpointMeta, streamed: dict[str, dict] | None = None) -> None:
    """Write ``meta.json`` last: format version and the manifest of the (already fsynced) files."""
    meta = dataclasses.replace(meta, format_version=FORMAT_VERSION, files=file_manifest(folder, streamed))
    write_atomic(Path(folder) / META, meta.to_json())


def _hash_problem(folder: Path, rel: str, expected: dict) -> str | None:
    path = Path(folder) / rel
    if WHOLE_HASH in expected:
        ok = whole_file_hash(path) == expected[WHOLE_HASH]
    elif "sha256_ends" in expected:
        ok = file_digest(path) == expected["sha256_ends"]
    else:
        return f"{rel} has no hash in {META}"
    return None if ok else f"{rel} does not match its hash in {META}"


def verify(folder: Path, meta: CheckpointMeta, *, hashes: bool = True, only: set[str] | None = None) -> str | None:
    """What is wrong with a checkpoint folder against its manifest, or None when it is intact.
    ``hashes=False`` checks presence and sizes only; ``only`` hashes just those files (a rank's share)."""
    files = meta.files or {}
    for rel, expected in files.items():
        path = Path(folder) / rel
        if not path.is_file():
            return f"{rel} is missing"
        size = path.stat().st_size
        if size != expected["size"]:
            return f"{rel} has {size} bytes, {META} says {expected['size']}"
    if not files:
        return f"{META} lists no files"
    if hashes:
        for rel, expected in files.items():
            if only is None or rel in only:
                problem = _hash_problem(folder, rel, expected)
                if problem:
                    return problem
    return None


_RANK_FILE = re.compile(r"(?:^rng_rank|^zero_pp_rank_|/zero_pp_rank_)(\d+)[._]")


def verify_share(meta: CheckpointMeta, rank: int, world: int) -> set[str]:
    """The files of a checkpoint that ``rank`` hashes on resume: its own per-rank files (its RNG,
    its ZeRO partition: the bytes it reads itself), and an about equal share by bytes of the
    shared ones. Every file is hashed by exactly one rank, so verifying costs each rank about
    1/world of the checkpoint."""
    files = meta.files or {}
    load = [0] * world
    owner: dict[str, int] = {}
    shared = []
    for rel, entry in files.items():
        m = _RANK_FILE.search(rel)
        if m and int(m.group(1)) < world:
            owner[rel] = int(m.group(1))
            load[owner[rel]] += entry["size"]
        else:
            shared.append(rel)
    for rel in sorted(shared, key=lambda r: (-files[r]["size"], r)):
        r = min(range(world), key=lambda i: (load[i], i))
        owner[rel] = r
        load[r] += files[rel]["size"]
    return {rel for rel, r in owner.items() if r == rank}


def expected_checkpoint_bytes(module) -> int:
    """What one checkpoint of ``module`` takes on disk, its tensors alone: every parameter in fp32
    (weights set) and the trainable ones' two Adam moments (moments set): 4 N + 8 T bytes (plus
    the small files: RNG, meta, config, tokenizer, index; format 6 holds no second copy)."""
    total = trainable = 0
    for p in module.parameters():
        n = int(getattr(p, "ds_numel", 0) or p.numel())
        total += n
        trainable += n if p.requires_grad else 0
    return 4 * total + 8 * trainable


def check_complete(folder: Path, *, hashes: bool = True) -> CheckpointMeta:
    """The meta of a complete, intact, resumable checkpoint; CheckpointError saying why not."""
    meta = read_meta(folder, for_resume=True)
    problem = verify(folder, meta, hashes=hashes)
    if problem:
        raise CheckpointError(f"{folder} is damaged ({problem}): pick another step-N folder")
    return meta


def check_intact(folder: Path) -> CheckpointMeta:
    """For eval/export/spectrum: the meta of a readable checkpoint whose files all match their
    hashes (format 1 has no manifest: nothing to check); CheckpointError naming the file."""
    meta = read_meta(folder)
    if meta.files:
        problem = verify(folder, meta)
        if problem:
            raise CheckpointError(f"{folder} is damaged ({problem}): pick another step-N folder")
    return meta


# ----------------------------------------------------------------------------- folders
def best_folder_per_step(root: Path) -> dict[int, list[Path]]:
    """step -> candidate folders with a meta.json, best first (step-N, then an interrupted
    swap's step-N.saving, then step-N.replaced)."""
    order = {None: 0, STAGING: 1, REPLACED: 2}
    found: dict[int, list[tuple[int, Path]]] = {}
    if Path(root).is_dir():
        for child in Path(root).iterdir():
            m = STEP_FOLDER.match(child.name)
            if m and child.is_dir() and (child / META).is_file():
                found.setdefault(int(m.group(1)), []).append((order[m.group(2)], child))
    return {step: [p for _, p in sorted(c)] for step, c in found.items()}


# ----------------------------------------------------------------------------- what a run depends on
def data_fingerprint(data_dir: str | Path) -> dict:
    """Hashes of what a resumed run must find unchanged: the prepared data (its meta.json, the
    size and ends of every shard) and the tokenizer files."""
    folder = Path(data_dir)
    data = hashlib.sha256((folder / "meta.json").read_bytes())
    for shard in sorted(folder.glob("*.bin")):
        data.update(shard.name.encode() + file_digest(shard).encode())
    tok = hashlib.sha256()
    tok_dir = folder / "tokenizer"
    if tok_dir.is_dir():
        for path in sorted(p for p in tok_dir.rglob("*") if p.is_file()):
            tok.update(path.relative_to(tok_dir).as_posix().encode() + path.read_bytes())
    return {"data_sha256": data.hexdigest(), "tokenizer_sha256": tok.hexdigest()}


# CheckpointMeta fields a resume must match, with the fix each mismatch needs.
_RESUME_KEYS = {
    "data_sha256": "the prepared data in data.path changed since it was written (re-prepared or replaced)",
    "tokenizer_sha256": "the tokenizer in data.path changed since it was written",
    "seq_len": "data.seq_len differs",
    "global_batch": "the global batch size differs",
    "micro_batch": "train.micro_batch_size differs",
    "grad_accum": "the gradient accumulation (global / (micro x world)) differs",
}


def check_resume_matches(folder: Path, meta: CheckpointMeta, current: dict) -> None:
    """Refuse to resume a checkpoint on other data, tokenizer or batch layout (one line).
    ``current``: this run's values of the :class:`CheckpointMeta` fields named in _RESUME_KEYS."""
    for key, what in _RESUME_KEYS.items():
        if key in current and getattr(meta, key) != current[key]:
            raise CheckpointError(
                f"cannot resume {folder}: {what} ({key} {getattr(meta, key)!r} in the checkpoint, {current[key]!r} now): "
                "restore the run's data and settings, or start a new run (another train.run_dir, "
                "relora.warm_start_from for a full-rank checkpoint)"
            )
