"""The run configuration: model/ReLoRA/training settings, separate from the DeepSpeed JSON
and from the launcher settings.

Long because the whole schema is one file: every section beside its range checks, so
``config --explain`` and the checks read from one place.

Three layers, kept apart on purpose:

* ``RunConfig`` (this file): what is trained and how (model, method, ReLoRA, optimizer, data,
  schedule, checkpoints). Read by every worker.
* the DeepSpeed runtime JSON (``deepspeed.config``, a file from ``ds_configs/``): ZeRO stage,
  precision, offload, comms logging. Batch sizes are *not* set there: they are injected from
  ``train`` (one source of truth) and a conflicting value in the JSON is an error.
* ``LaunchConfig`` (``launch:`` section): how processes are started (launcher, hosts, GPUs per
  node, master address). Read only by the parent ``ds-relora train`` process.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Literal, Optional

import yaml

from ds_relora.config_base import Checked, apply_overrides, doc, from_dict, to_dict
from ds_relora.errors import ConfigError

Method = Literal["full", "lora", "relora", "control", "mora", "remora", "galore", "apollo", "apollo_mini", "fira"]

_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)d)?(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?$")

RECIPES = Path(__file__).parent / "recipes"


def resolve_config_path(name: str | None) -> str | None:
    """A config by path, or a shipped recipe by bare name (``quickstart``)."""
    if name is None or Path(name).is_file():
        return name
    recipe = RECIPES / (name if name.endswith(".yaml") else name + ".yaml")
    return str(recipe) if recipe.is_file() else name



def parse_duration(value, where: str = "train.time_limit") -> float | None:
    """Seconds of '13800', '3h50m', '90m', '1d2h', '03:50:00' or '50:00' (MM:SS); None stays None."""
    if value is None:
        return None
    text = str(value).strip().lower()
    seconds = None
    if re.fullmatch(r"\d+(\.\d+)?", text):
        seconds = float(text)
    elif re.fullmatch(r"\d+(:\d{1,2}){1,2}", text):
        parts = [int(p) for p in text.split(":")]
        seconds = float(sum(p * 60 ** i for i, p in enumerate(reversed(parts))))
    elif text and (m := _DURATION.match(text)):
        d, h, mi, s = (float(g or 0) for g in m.groups())
        seconds = ((d * 24 + h) * 60 + mi) * 60 + s
    if seconds is None or seconds <= 0:
        raise ConfigError(f"{where}={value!r} is not a positive duration: write seconds (13800), '3h50m', '90m' or 'HH:MM:SS'")
    return seconds



@dataclasses.dataclass
class ModelConfig(Checked):
    preset: Optional[str] = doc("tiny", "LLaMA-shaped preset (tiny, 9m, 20m, 35m, 60m, 130m, 250m, 350m, 1.3b, 3b, 7b, 13b, cpu85); null when name_or_path is set")
    name_or_path: Optional[str] = doc(None, "HF hub name or local folder of a causal-LM config/checkpoint to continue pre-training from, instead of a preset")
    from_pretrained: bool = doc(False, "with name_or_path: load its weights (true) or only its config with fresh weights (false)")
    max_position_embeddings: Optional[int] = doc(None, "model context length; default: data.seq_len")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = doc("auto", "attention kernel: auto = flash-attn on a GPU in bf16/fp16 when it imports, else PyTorch SDPA")
    init_std: float = doc(0.02, "std of the normal init of linear and embedding weights")
    split_vocab: bool = doc(False, "hold the embedding and the head in row blocks no larger than an attention projection (hidden x hidden), so ZeRO gathers, reduces and initialises one block at a time (from 7B up: what a rank holds for a moment is then a decoder layer's, not 2-3 x the embedding); checkpoints and exports keep the whole tensors under HF's names; the head's input gradient then sums the blocks (other bits than unsplit, the same on every stage); needs an untied embedding and head")

    SECTION = "model"

    def validate(self) -> None:
        n = self.max_position_embeddings
        self.require("max_position_embeddings", n is None or n >= 1, "must be at least 1: set the context length or null for data.seq_len")
        self.require("init_std", self.init_std > 0, "must be positive: e.g. 0.02")


@dataclasses.dataclass
class ReLoRAConfig(Checked):
    rank: int = doc(128, "adapter rank r")
    alpha: float = doc(32.0, "adapter scale numerator: s = alpha / rank")
    dropout: float = doc(0.1, "dropout on the adapter input only")
    target_modules: list[str] = doc(help="regexes matched (re.search) against module names; matching nn.Linear layers get adapters", factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    freeze_modules: list[str] = doc(help="regexes of further parameter names to freeze (embeddings, norms and lm_head train full-rank by default)", factory=list)
    reset_every: int = doc(1000, "steps between merge-and-reinit (the cycle length C)")
    restart_warmup_steps: int = doc(50, "steps of linear LR re-warm-up after each reset")
    warm_start_steps: int = doc(0, "full-rank steps before switching to the adapter method inside the same run (lora, relora, mora, remora, galore)")
    warm_start_from: Optional[str] = doc(None, "checkpoint folder (step-N) of a full-rank run to start ReLoRA from")
    optimizer_reset: Literal["magnitude", "random", "full", "none"] = doc("magnitude", "how the adapters' Adam moments are reset at each merge")
    prune_ratio: float = doc(0.99, "fraction of each adapter's moments pruned by the optimizer reset, in [0, 1)")
    lr: Optional[float] = doc(None, "peak LR of the ReLoRA phase (paper: ~2x the full-rank LR); default optim.lr")
    jagged_schedule: bool = doc(True, "restart the LR from 0 at every reset (false: plain cosine, ablation)")
    keep_base_fp32: bool = doc(False, "keep frozen W in fp32 under bf16 (merges do not round); uses DeepSpeed torch_autocast instead of bf16 params")
    fuse_shared_inputs: bool = doc(True, "one dropout and one adapter GEMM per input shared by q/k/v and by gate/up (members share one dropout mask); false: one per linear")
    zero3_frozen_base: Literal["partition", "replicate"] = doc("partition", "ZeRO-3 only: partition the frozen base weights (DeepSpeed's default) or replicate them, kept gathered on every rank (+2-4 bytes per frozen param per GPU; saves re-gathers only when stage3_max_live_parameters is small)")
    save_at_switch: bool = doc(True, "checkpoint the full-rank model at the warm-start switch (step-<warm_start_steps>), even with train.save_every: 0; skipped when that step was just saved")

    SECTION = "relora"

    def validate(self) -> None:
        self.require("rank", self.rank >= 1, "must be at least 1: set the adapter rank, e.g. 128")
        self.require("alpha", self.alpha > 0, "must be positive: the adapter scale is alpha / rank, e.g. 32")
        self.require("dropout", 0.0 <= self.dropout < 1.0, "must be in [0, 1): e.g. 0.1, or 0 for none")
        self.require("reset_every", self.reset_every >= 1, "must be at least 1: steps between merges, e.g. 1000")
        self.require("restart_warmup_steps", self.restart_warmup_steps >= 0, "must be 0 or more: e.g. 50")
        self.require("warm_start_steps", self.warm_start_steps >= 0, "must be 0 or more: full-rank steps before the switch")
        self.require("lr", self.lr is None or self.lr > 0, "must be positive: set the ReLoRA peak LR, or null for optim.lr")
        self.require("target_modules", len(self.target_modules) > 0, "is empty: list regexes of the linear layers to wrap, e.g. [q_proj, v_proj]")
        for name in ("target_modules", "freeze_modules"):
            for pattern in getattr(self, name):
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ConfigError(f"relora.{name} entry {pattern!r} is not a valid regex ({exc}): fix or quote it") from None


@dataclasses.dataclass
class MoRAConfig(Checked):
    """MoRA / ReMoRA (seed 003). ReMoRA merges with the ``relora`` section's reset_every,
    optimizer_reset, jagged_schedule and warm start; the targets are ``relora.target_modules``."""

    rank: Optional[int] = doc(None, "LoRA-equivalent rank r (null: relora.rank); each layer's square M is r̂ x r̂ with r̂ = int(sqrt((in + out) * r) + 0.5), as many params as LoRA of rank r")
    compression: Literal["sharing", "rope"] = doc("sharing", "compression of the input to r̂ dims: sharing (Eq. 6, for large r; the paper's pre-training choice) or rope (Eq. 8-10, for small r)")
    switch_groups: bool = doc(True, "remora: change the grouping after every merge (false: merged updates share one pattern and the rank of the accumulated update does not grow; ablation)")

    SECTION = "mora"

    def validate(self) -> None:
        self.require("rank", self.rank is None or self.rank >= 1, "must be at least 1: or null for relora.rank")


@dataclasses.dataclass
class GaLoreConfig(Checked):
    """GaLore (seed 001), as its reference package galore-torch defines it. The projected layers
    are ``relora.target_modules``; embeddings, norms and the head train with plain Adam."""

    rank: Optional[int] = doc(None, "projection rank r (null: relora.rank): top-r singular vectors of the gradient, on the smaller side")
    update_proj_gap: int = doc(200, "steps between projector updates (an SVD of the step's gradient)")
    scale: float = doc(0.25, "GaLore's scale alpha: the projected-back update is multiplied by it")
    proj_type: Literal["std"] = doc("std", "projection side: std (the smaller side, galore-torch's default; the only one supported)")

    SECTION = "galore"

    def validate(self) -> None:
        self.require("rank", self.rank is None or self.rank >= 1, "must be at least 1: or null for relora.rank")
        self.require("update_proj_gap", self.update_proj_gap >= 1, "must be at least 1: steps between projector updates, e.g. 200")
        self.require("scale", self.scale > 0, "must be positive: e.g. 0.25")


@dataclasses.dataclass
class ApolloConfig(Checked):
    """APOLLO (apollo-torch's APOLLOAdamW): W trained, its gradient projected to rank r in the
    optimizer; the projected layers are ``relora.target_modules``, the rest plain AdamW."""

    rank: Optional[int] = doc(None, "projection rank r (null: relora.rank)")
    proj: Literal["random", "svd"] = doc("random", "projector: random (seeded Gaussian / sqrt(r), no communication) or svd (top-r singular vectors of the gradient)")
    scale_type: Literal["channel", "tensor"] = doc("channel", "gradient scaling factor per channel (row of a tall, column of a wide matrix) or per tensor")
    update_proj_gap: int = doc(200, "steps between projector changes")
    scale: float = doc(1.0, "the scaled gradient is multiplied by sqrt(scale) (apollo-torch's apollo_scale)")
    limiter: bool = doc(True, "norm-growth limiter (Fira's): the update's norm grows at most 1.01x per step")

    SECTION = "apollo"

    def validate(self) -> None:
        self.require("rank", self.rank is None or self.rank >= 1, "must be at least 1: or null for relora.rank")
        self.require("update_proj_gap", self.update_proj_gap >= 1, "must be at least 1: steps between projector changes, e.g. 200")
        self.require("scale", self.scale > 0, "must be positive: e.g. 1 (APOLLO) or 128 (APOLLO-Mini)")


@dataclasses.dataclass
class ApolloMiniConfig(ApolloConfig):
    """APOLLO-Mini: APOLLO with rank 1 and tensor-wise scaling (its optimizer state per matrix is
    O(max side)); scale 128 as in the APOLLO authors' scripts."""

    rank: Optional[int] = doc(1, "projection rank (1: APOLLO-Mini; null: relora.rank)")
    scale_type: Literal["channel", "tensor"] = doc("tensor", "gradient scaling factor per tensor (APOLLO-Mini) or per channel")
    scale: float = doc(128.0, "the scaled gradient is multiplied by sqrt(scale)")

    SECTION = "apollo_mini"


@dataclasses.dataclass
class FiraConfig(Checked):
    """Fira (the fira package's FiraAdamW): GaLore's SVD projector plus the scaled residual of the
    gradient; the projected layers are ``relora.target_modules``, the rest plain AdamW."""

    rank: Optional[int] = doc(None, "projection rank r (null: relora.rank)")
    update_proj_gap: int = doc(200, "steps between projector updates (an SVD of the step's gradient)")
    alpha: float = doc(1.0, "scale of the projected-back parts (the package's alpha; its default 1)")

    SECTION = "fira"

    def validate(self) -> None:
        self.require("rank", self.rank is None or self.rank >= 1, "must be at least 1: or null for relora.rank")
        self.require("update_proj_gap", self.update_proj_gap >= 1, "must be at least 1: steps between projector updates, e.g. 200")
        self.require("alpha", self.alpha > 0, "must be positive: e.g. 1 or 0.25")


@dataclasses.dataclass
class OptimConfig(Checked):
    lr: float = doc(1e-3, "peak learning rate")
    weight_decay: float = doc(0.0, "AdamW weight decay")
    betas: list[float] = doc(help="AdamW betas", factory=lambda: [0.9, 0.999])
    eps: float = doc(1e-8, "AdamW epsilon")
    warmup_steps: int = doc(100, "linear LR warm-up at the start of training")
    min_lr_ratio: float = doc(0.1, "cosine floor as a fraction of the peak LR")
    grad_clip: float = doc(1.0, "gradient-norm clip (0 disables)")

    SECTION = "optim"

    def validate(self) -> None:
        self.require("lr", self.lr > 0, "must be positive: set the peak learning rate, e.g. 1e-3")
        self.require("weight_decay", self.weight_decay >= 0, "must be 0 or more: e.g. 0.0 or 0.1")
        self.require("betas", len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas),
                     "must be two numbers in [0, 1): e.g. [0.9, 0.999]")
        self.require("eps", self.eps > 0, "must be positive: e.g. 1e-8")
        self.require("warmup_steps", self.warmup_steps >= 0, "must be 0 or more: e.g. 100")
        self.require("min_lr_ratio", 0.0 <= self.min_lr_ratio <= 1.0, "must be in [0, 1]: e.g. 0.1")
        self.require("grad_clip", self.grad_clip >= 0, "must be 0 (off) or positive: e.g. 1.0")


@dataclasses.dataclass
class DataConfig(Checked):
    path: str = doc("data/stdlib", "folder written by `ds-relora prepare-data` (token shards + tokenizer)")
    seq_len: int = doc(256, "tokens per training sequence")

    SECTION = "data"

    def validate(self) -> None:
        self.require("seq_len", self.seq_len >= 1, "must be at least 1: set the tokens per training sequence, e.g. 256")


@dataclasses.dataclass
class PrepareConfig(Checked):
    source: str = doc("stdlib", "corpus: 'stdlib' (embedded default), local .jsonl/.txt/.parquet file/folder/glob, or hf:NAME[:CONFIG] for an HF dataset (streamed)")
    text_field: str = doc("text", "field holding the document text in jsonl/parquet/HF rows")
    split: str = doc("train", "split of an HF dataset")
    tokenizer: Optional[str] = doc(None, "HF tokenizer name or path; null trains a byte-level BPE on the corpus")
    vocab_size: int = doc(4096, "vocabulary size of the trained BPE tokenizer")
    max_documents: Optional[int] = doc(None, "stop after this many documents (null: all)")
    max_tokens: Optional[int] = doc(None, "stop after this many tokens (null: all)")
    val_fraction: float = doc(0.02, "fraction of documents held out for validation")
    shard_tokens: int = doc(50_000_000, "tokens per shard file")
    seed: int = doc(0, "seed of the train/validation split")
    num_workers: int = doc(1, "processes that tokenize on this node (1: in the prepare-data process itself); the output is byte-identical for any value, so set it to the free CPU cores")

    SECTION = "prepare"

    def validate(self) -> None:
        # vocab_size's lower bound depends on the tokenizer kind: checked by prepare_data.
        self.require("val_fraction", 0.0 <= self.val_fraction < 1.0, "must be in [0, 1): e.g. 0.02")
        self.require("shard_tokens", self.shard_tokens >= 1, "must be at least 1: e.g. 50000000")
        for name in ("max_documents", "max_tokens"):
            value = getattr(self, name)
            self.require(name, value is None or value >= 1, "must be at least 1: set a positive limit or null for no limit")
        self.require("num_workers", self.num_workers >= 1, "must be at least 1: set the tokenizing processes on this node, e.g. its CPU core count (1: no extra processes)")


@dataclasses.dataclass
class TrainConfig(Checked):
    method: Method = doc("relora", "full (full-rank), lora (adapters, never merged), relora, control (smaller full-rank model with ReLoRA's trainable params), mora (square adapter, never merged), remora (MoRA merged ReLoRA-style), galore (gradient low-rank projection), apollo / apollo_mini / fira (W trained, its gradient projected in the optimizer: APOLLO, APOLLO-Mini, Fira)")
    total_steps: int = doc(1000, "optimizer steps in the whole run, warm start included")
    micro_batch_size: int = doc(8, "sequences per rank per micro-step")
    global_batch_size: Optional[int] = doc(None, "sequences per optimizer step over all ranks; default micro_batch_size x world size (gradient accumulation = global / (micro x world))")
    seed: int = doc(0, "seed of model init, data order and adapter re-inits")
    eval_every: int = doc(200, "steps between validation evaluations (0: only at the end)")
    eval_batches: int = doc(20, "micro-batches per rank in one validation pass")
    save_every: int = doc(500, "steps between checkpoints (0: only at the end)")
    keep_last: int = doc(2, "checkpoints to keep (0 keeps all)")
    log_every: int = doc(1, "steps between progress-bar refreshes")
    run_dir: str = doc("runs/default", "output folder: metrics.jsonl, checkpoints/, resolved config")
    stop_after_steps: Optional[int] = doc(None, "checkpoint and exit (code 75) once this global step is reached; ignored by a job resumed at or past it (for requeued jobs use max_steps_per_job or time_limit)")
    time_limit: Optional[str] = doc(None, "wall time this job may train, then checkpoint and exit with code 75 (requeue): seconds, '3h50m', '90m' or 'HH:MM:SS'; leave a margin for one step and one checkpoint")
    max_steps_per_job: Optional[int] = doc(None, "train at most this many more steps in this job, then checkpoint and exit with code 75 (requeue)")
    resume: Optional[str] = doc(None, "'auto' (latest valid checkpoint in run_dir), a step-N folder, or null")
    tensorboard: bool = doc(False, "also log scalars to TensorBoard (run_dir/tb)")
    wandb_project: Optional[str] = doc(None, "also log to this W&B project")
    activation_checkpointing: bool = doc(False, "recompute activations in backward to save memory")
    compile: bool = doc(False, "torch.compile the model through DeepSpeed's engine.compile (each phase's engine; the first steps pay the compile time). Pays on GPUs with ZeRO 0-2; under ZeRO-3 DeepSpeed's gather hooks split the graph at every module")
    compile_backend: str = doc("inductor", "torch.compile backend with train.compile: inductor (generated kernels), or aot_eager / eager to check that a model traces without generating code")

    SECTION = "train"

    def validate(self) -> None:
        self.require("total_steps", self.total_steps >= 1, "must be at least 1: set the optimizer steps of the run")
        self.require("micro_batch_size", self.micro_batch_size >= 1, "must be at least 1: sequences per rank per micro-step")
        g = self.global_batch_size
        self.require("global_batch_size", g is None or g >= 1, "must be at least 1: or null for micro_batch_size x ranks")
        for name in ("eval_every", "save_every", "keep_last"):
            self.require(name, getattr(self, name) >= 0, "must be 0 or more (0: see `ds-relora config --explain`)")
        self.require("eval_batches", self.eval_batches >= 1, "must be at least 1: micro-batches per rank in one validation pass")
        self.require("log_every", self.log_every >= 1, "must be at least 1: steps between progress refreshes")
        n = self.stop_after_steps
        self.require("stop_after_steps", n is None or n >= 1, "must be at least 1: or null to train to total_steps")
        n = self.max_steps_per_job
        self.require("max_steps_per_job", n is None or n >= 1, "must be at least 1 (or null)")

        parse_duration(self.time_limit, "train.time_limit")
        # compile_backend is checked against torch's backends by plan_run (it needs torch).


@dataclasses.dataclass
class DeepSpeedSection:
    config: str = doc("ds_configs/zero2.json", "DeepSpeed runtime JSON (ZeRO stage, precision, offload); batch sizes come from `train`")
    overrides: dict = doc(help="keys merged into the JSON (nested dicts), e.g. {zero_optimization: {stage: 3}}", factory=dict)


@dataclasses.dataclass
class LaunchConfig:
    launcher: Literal["local", "deepspeed", "mpi", "slurm", "none"] = doc("local", "local: `deepspeed --num_gpus` on this node; deepspeed: multi-node through a hostfile; mpi: mpirun + mpi4py discovery; slurm: srun with ranks from SLURM variables; none: run in this process (1 rank)")
    num_gpus: int = doc(1, "processes per node (GPUs per node; on CPU, ranks per node)")
    num_nodes: int = doc(1, "nodes in the job")
    hostfile: Optional[str] = doc(None, "hostfile ('host slots=N' lines) for multi-node launches")
    master_addr: Optional[str] = doc(None, "address of rank 0 (default: first host)")
    master_port: int = doc(29500, "TCP port of the rendezvous on the master")
    no_ssh: bool = doc(False, "start the launcher on each node yourself (with node_rank) instead of pdsh/ssh")
    node_rank: int = doc(0, "this node's rank in no_ssh mode")
    mpi_flavor: Literal["auto", "openmpi", "mpich"] = doc("auto", "MPI implementation for launcher=mpi")
    extra_args: list[str] = doc(help="extra arguments passed verbatim to the launcher", factory=list)


@dataclasses.dataclass
class RunConfig:
    model: ModelConfig = doc(help="model shape", factory=ModelConfig)
    relora: ReLoRAConfig = doc(help="adapter-phase settings: ReLoRA's adapter, and for every adapter method the targets, warm start, LR, reset cycle", factory=ReLoRAConfig)
    mora: MoRAConfig = doc(help="MoRA / ReMoRA square-adapter settings (train.method mora, remora)", factory=MoRAConfig)
    galore: GaLoreConfig = doc(help="GaLore projection settings (train.method galore)", factory=GaLoreConfig)
    apollo: ApolloConfig = doc(help="APOLLO settings (train.method apollo)", factory=ApolloConfig)
    apollo_mini: ApolloMiniConfig = doc(help="APOLLO-Mini settings (train.method apollo_mini)", factory=ApolloMiniConfig)
    fira: FiraConfig = doc(help="Fira settings (train.method fira)", factory=FiraConfig)
    optim: OptimConfig = doc(help="optimizer and LR schedule", factory=OptimConfig)
    data: DataConfig = doc(help="prepared training data", factory=DataConfig)
    prepare: PrepareConfig = doc(help="`ds-relora prepare-data` settings", factory=PrepareConfig)
    train: TrainConfig = doc(help="loop, batch, eval and checkpoint settings", factory=TrainConfig)
    deepspeed: DeepSpeedSection = doc(help="DeepSpeed runtime layer", factory=DeepSpeedSection)
    launch: LaunchConfig = doc(help="launcher layer (parent process only)", factory=LaunchConfig)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config (or the defaults when ``path`` is None) and apply ``--set`` overrides."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist: pass an existing YAML file (see recipes/ or ds_relora/recipes/)")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            first = str(exc).splitlines()[0]
            raise ConfigError(f"config file {p} is not valid YAML ({first}): fix the syntax") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {p} must hold a mapping of sections (model:, train:, ...)")
    data = apply_overrides(data, overrides or [])
    return from_dict(RunConfig, data)


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
