"""Export a checkpoint of any ZeRO stage as a plain merged Hugging Face model (safetensors)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
from pathlib import Path

import torch

from ds_relora import __version__
from ds_relora.checkpoint.format import check_intact, fsync_dir, fsync_tree, hf_config_file, public_mode
from ds_relora.checkpoint.weights import EffectiveWeights, iter_effective_weights
from ds_relora.disk import check_free_space, disk_error, is_disk_error
from ds_relora.errors import CheckpointError
from ds_relora.tensor_files import StreamingWriter, nbytes, shard_name, write_index


def _checkpoint_config(folder: Path):
    from transformers import AutoConfig  # noqa: PLC0415  (transformers takes seconds to import; only code that builds a model needs it)

    check_intact(folder)  # every file against its hash in meta.json: damage is one line, never a model
    return AutoConfig.from_pretrained(str(hf_config_file(folder)))


def _loaded(config, model) -> dict[str, torch.Tensor]:
    """The model's tensors a checkpoint holds: tied embeddings appear once (no ``lm_head``)."""
    return {n: t for n, t in model.state_dict().items() if not (config.tie_word_embeddings and n == "lm_head.weight")}


def _expected_shapes(config) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a model of ``config`` loads (built on the meta device: no memory)."""
    from transformers import AutoModelForCausalLM  # noqa: PLC0415  (transformers takes seconds to import; only code that builds a model needs it)

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {n: tuple(t.shape) for n, t in _loaded(config, model).items()}


def _check_fits(folder: Path, expected: dict[str, tuple[int, ...]], seen: dict[str, tuple[int, ...]]) -> None:
    missing = [n for n in expected if n not in seen]
    unexpected = [n for n in seen if n not in expected]
    wrong = [n for n in seen if n in expected and seen[n] != expected[n]]
    if missing or unexpected or wrong:
        raise CheckpointError(f"{folder}: weights do not match its {hf_config_file(folder).name} (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}, other shapes {wrong[:3]})")


def load_merged_model(checkpoint: str | Path, dtype: torch.dtype = torch.float32):
    """The checkpoint's model with every adapter folded into its base weight (filled one module
    at a time: the model plus one layer's tensors in memory)."""
    from transformers import AutoModelForCausalLM  # noqa: PLC0415  (transformers takes seconds to import; only code that builds a model needs it)

    folder = Path(checkpoint)
    config = _checkpoint_config(folder)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=getattr(config, "_attn_implementation", None) or "sdpa")
    targets = _loaded(config, model)
    seen = {}
    with torch.no_grad():
        for name, tensor in iter_effective_weights(folder):
            seen[name] = tuple(tensor.shape)
            if name in targets and tuple(targets[name].shape) == seen[name]:
                targets[name].copy_(tensor)
    _check_fits(folder, {n: tuple(t.shape) for n, t in targets.items()}, seen)
    return model.to(dtype).eval()


def _shard_plan(weights: EffectiveWeights, expected: dict[str, tuple[int, ...]], dtype: torch.dtype,
                max_shard_bytes: int) -> list[list[tuple[str, torch.dtype, tuple[int, ...]]]]:
    """The export's shards, each a list of (name, dtype, shape) in the order the modules are
    folded: a fold keeps W's name and shape and drops the adapters, so the plan comes from the
    checkpoint's index alone, before any tensor is read."""
    groups: list[list] = [[]]
    size = 0
    for prefix, names in weights.modules.items():
        for name in names:
            if name not in expected:
                continue  # an adapter (folded away) or a tensor the config lacks (reported by _check_fits)
            entry = (name, dtype, expected[name])
            if groups[-1] and size + nbytes(entry[2], dtype) > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(entry)
            size += nbytes(entry[2], dtype)
    return groups if groups[-1] else []


def _write_weights(folder: Path, config, out: Path, dtype: torch.dtype, max_shard_bytes: int) -> None:
    """The folded weights in HF's layout (``model.safetensors``, or shards of at most
    ``max_shard_bytes`` with an index). Each tensor goes to its shard's file as soon as its module
    is folded (:class:`StreamingWriter`: the header is planned up front), so the export holds
    one module's tensors, whatever the shard size."""
    expected = _expected_shapes(config)
    weights = EffectiveWeights(folder)
    groups = _shard_plan(weights, expected, dtype, max_shard_bytes)
    where = {name: i for i, group in enumerate(groups) for name, _, _ in group}
    seen: dict[str, tuple[int, ...]] = {}
    writer, index = None, -1
    try:
        for prefix in weights.modules:
            folded = weights.module(prefix)
            seen.update({n: tuple(t.shape) for n, t in folded.items()})
            if any(n not in where or seen[n] != expected[n] for n in folded):
                break  # _check_fits names the mismatch below
            for name in (n for n in weights.modules[prefix] if n in folded):
                while where[name] != index:
                    if writer is not None:
                        writer.close()
                    index += 1
                    writer = StreamingWriter(out / f"part-{index}", groups[index], {"format": "pt"})
                writer.write(name, folded[name].to(dtype))
            del folded
        _check_fits(folder, expected, seen)
        if writer is not None:
            writer.close()
            writer = None
    finally:
        if writer is not None:
            writer.abort()
    if len(groups) == 1:
        os.replace(out / "part-0", out / "model.safetensors")
        return
    weight_map = {}
    for i, group in enumerate(groups):
        name = shard_name("model", i, len(groups))
        os.replace(out / f"part-{i}", out / name)
        weight_map.update({n: name for n, _, _ in group})
    write_index(out, "model", weight_map, sum(nbytes(shape, dtype) for shape in seen.values()))


EXPORT_MARKER = "ds_relora_export.json"


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out} is a file, not a folder: pass a folder path for the exported model")
    if out.is_dir() and any(out.iterdir()) and not (out / EXPORT_MARKER).is_file() and not overwrite:
        raise CheckpointError(
            f"--out {out} is a non-empty folder that is not a ds-relora export: pick another folder, "
            "or pass --overwrite to replace its contents"
        )


def export_model(checkpoint: str | Path, out_dir: str | Path, dtype: str = "float32", *, overwrite: bool = False,
                 max_shard_bytes: int = 1 << 30) -> Path:
    """Write ``out_dir`` (config.json, model.safetensors or HF shards, tokenizer) atomically,
    streaming module by module: one module's weights in memory, whatever the shard size.

    An existing ``out_dir`` is replaced only when it is empty, a previous export (it holds
    ``ds_relora_export.json``) or ``overwrite`` is set; the new export is built beside it and
    swapped in, so an interrupted export leaves the old one (or nothing) and no temp folder."""
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if torch_dtype is None:
        raise CheckpointError(f"--dtype {dtype} is not supported: use float32, bfloat16 or float16")
    out = Path(out_dir)
    _check_out(out, overwrite)
    if out.parent.exists() and not out.parent.is_dir():
        raise CheckpointError(f"--out {out}: {out.parent} is a file, not a folder: choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(checkpoint)
    config = _checkpoint_config(folder)
    tag = f"{socket.gethostname()}.{os.getpid()}"
    for stale in out.parent.glob(out.name + ".tmp-export*"):  # left by an export that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp, aside = out.with_name(f"{out.name}.tmp-export.{tag}"), out.with_name(f"{out.name}.tmp-export-old.{tag}")

    needed = sum(nbytes(shape, torch_dtype) for shape in _expected_shapes(config).values())
    check_free_space(out.parent, needed, "--out", what="the export")
    try:
        tmp.mkdir()
        _write_weights(folder, config, tmp, torch_dtype, max_shard_bytes)
        config.dtype = torch_dtype
        config.save_pretrained(str(tmp))
        tokenizer = Path(checkpoint) / "tokenizer"
        if tokenizer.is_dir():
            from transformers import AutoTokenizer  # noqa: PLC0415  (optional dependency: imported only where it is used)

            AutoTokenizer.from_pretrained(str(tokenizer)).save_pretrained(str(tmp))
        (tmp / EXPORT_MARKER).write_text(json.dumps({"checkpoint": str(Path(checkpoint).resolve()), "dtype": dtype,
                                                     "ds_relora_version": __version__}, indent=2))
        for path in tmp.rglob("*"):
            if path.is_file():
                public_mode(path)  # safetensors writes 0600
        fsync_tree(tmp)
        if out.exists():
            os.rename(out, aside)
        os.rename(tmp, out)
        fsync_dir(out.parent)
    except Exception as exc:
        # safetensors reports a failed write as its own error type, with the OS error code in the text.
        code = re.search(r"code: (\d+)", str(exc)) if not isinstance(exc, OSError) else None
        if code:
            exc = OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(tmp))
        if is_disk_error(exc):
            raise disk_error(exc, tmp, needed=needed, setting="--out") from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(aside, ignore_errors=True)
    return out
