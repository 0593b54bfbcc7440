"""`speakwatch finetune`: fine-tune a Qwen2-VL / Qwen2.5-VL checkpoint for a position scheme.

Trains exactly what is served (training.md): each sample is laid out by `runtime.training.data.lay_out`
(the session scheduler's own chunk functions), cut into patches by the runtime's `FrameGeometry`,
numbered by ``positional.assign`` over the segments the vLLM hook would classify, and attended
causally in arrival order, as vLLM serves it. The loss is on the sampled answer tokens only, read
from the position each was sampled from. The paper's mask (frames never see answer text) is an
option (``mask="paper"``), not what vLLM serves.

Runs alone or under ``torchrun`` / ``accelerate launch`` (DDP: gloo on CPU, NCCL on GPUs).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np
import torch

import positional
from runtime import layout
from runtime.engine import ModelInfo
from runtime.layout import IGNORE
from runtime.perception import FrameGeometry
from runtime.training.data import LaidOut, Sample, lay_out, read_jsonl

log = logging.getLogger("speakwatch.finetune")

MASKS = ("served", "paper")
RECORD_KEY = "speakwatch"  # config.json key of what a checkpoint was trained for
LLM_LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
CHECKPOINT_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "generation_config.json",
    "special_tokens_map.json",
)


@dataclass
class FinetuneConfig:
    """Every knob of a fine-tuning run; defaults follow the paper's recipe (Sec. 4.4, its sft.sh)."""

    model: Path
    output: Path
    data: str = "synthetic"  # a JSONL file (runtime/training/data.py), or "synthetic"
    positions: str = "group-decoupled"
    gap: int = positional.DEFAULT_GAP
    turn_tokens: int = 3  # K: answer tokens per turn (the paper's wait-K = 3 per 1 s step at 2 fps)
    mask: str = "served"
    lr: float = 2e-5
    warmup: float = 0.03  # fraction of the steps
    epochs: float = 1.0
    max_steps: int | None = None
    synthetic_samples: int = 20_000  # one epoch of the synthetic task
    per_device_batch: int = 1
    effective_batch: int = 64
    train_vision: bool = False  # the vision tower itself (the merger is trained unless train_merger=False)
    train_merger: bool = True
    train_llm: bool = True
    vision_lr_scale: float = 1.0  # the vision tower's (and merger's) lr relative to ``lr``
    lora: bool = False
    lora_rank: int = 16
    lora_alpha: int = 32
    weight_decay: float = 0.0
    max_length: int = 8192
    pixel_budget: int | None = None
    dtype: str = "float32"
    gradient_checkpointing: bool = False
    seed: int = 0
    log_every: int = 10
    threads: int | None = None
    extra_record: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.model, self.output = Path(self.model), Path(self.output)
        if self.positions not in positional.SCHEMES:
            raise ValueError(
                f"unknown position scheme {self.positions!r}; choose one of {positional.SCHEMES}"
            )
        if self.mask not in MASKS:
            raise ValueError(f"mask must be one of {MASKS}, got {self.mask!r}")
        if self.turn_tokens < 1 or self.per_device_batch < 1 or self.effective_batch < 1:
            raise ValueError("turn_tokens, per_device_batch and effective_batch must be >= 1")
        if not 0 <= self.warmup < 1:
            raise ValueError("warmup is a fraction of the steps in [0, 1)")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError("dtype must be float32 or bfloat16")


@dataclass(frozen=True)
class Batch:
    """One padded micro-batch, as tensors the model takes."""

    input_ids: object
    attention_mask: object
    position_ids: object
    pixel_values: object
    image_grid_thw: object
    labels: object
    tokens: int  # supervised tokens


# --- samples to tensors ---------------------------------------------------------------------------


class Encoder:
    """Turns samples into model inputs with the runtime's own preprocessing and layout."""

    def __init__(self, info: ModelInfo, config: FinetuneConfig):
        self.info = info
        self.chat = info.chat
        self.config = config
        self.geometry = FrameGeometry.from_checkpoint(info, config.pixel_budget)

    def encode(self, sample: Sample, rng: np.random.Generator) -> tuple[LaidOut, list[np.ndarray]]:
        """Layout of one sample and the patches of each item in it (in stream order).

        Grids come from the frame sizes alone; only frames the layout uses are resized and cut.
        """
        grids = [self.geometry.grid(*frame.shape[:2]) for frame in sample.frames]
        laid = lay_out(sample, self.chat, grids, self.info.spatial_merge_size, self.config.turn_tokens, rng)
        return laid, [self.geometry.patchify([sample.frames[item.frame]])[0] for item in laid.items]

    def collate(self, samples: Sequence[Sample], rng: np.random.Generator) -> Batch:
        """A padded micro-batch of samples, each laid out by a fresh draw of the random schedule."""
        rows = []
        for sample in samples:
            laid, patches = self.encode(sample, rng)
            if len(laid.labels) > self.config.max_length:
                raise ValueError(
                    f"sample {sample.name}: {len(laid.labels)} tokens exceed "
                    f"max_length {self.config.max_length}"
                )
            rows.append((laid, patches))
        return self.batch(rows)

    def batch(self, rows: Sequence[tuple[LaidOut, Sequence[np.ndarray]]]) -> Batch:
        """Tensors for laid-out streams and the patches of their items (in stream order)."""
        chat = self.chat
        length = max(len(laid.labels) for laid, _ in rows)
        n = len(rows)
        input_ids = torch.full((n, length), _pad_id(chat), dtype=torch.long)
        labels = torch.full((n, length), IGNORE, dtype=torch.long)
        position_ids = torch.zeros((3, n, length), dtype=torch.long)
        valid = torch.zeros((n, length), dtype=torch.bool)
        masks = []
        for b, (laid, _) in enumerate(rows):
            ids = layout.expanded_ids(chat, laid.pieces)
            segments = layout.segments_of(chat, laid.pieces)
            positions = positional.assign(self.config.positions, segments, tau=1.0, gap=self.config.gap)
            input_ids[b, : len(ids)] = torch.tensor(ids)
            labels[b, : len(ids)] = torch.tensor(laid.labels)
            position_ids[:, b, : len(ids)] = torch.from_numpy(np.asarray(positions, dtype=np.int64))
            valid[b, : len(ids)] = True
            if self.config.mask == "paper":
                masks.append(positional.streaming_mask(segments))
        if self.config.mask == "paper":
            allowed = torch.zeros((n, 1, length, length), dtype=torch.bool)
            for b, mask in enumerate(masks):
                allowed[b, 0, : mask.shape[0], : mask.shape[1]] = mask
            allowed |= torch.eye(length, dtype=torch.bool)  # padding rows attend to themselves (no NaN)
            # additive: transformers passes a 4-D mask through as is, and eager attention adds it
            attention_mask = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill(
                ~allowed, torch.finfo(torch.float32).min
            )
        else:
            attention_mask = valid.long()
        patches = [p for _, row_patches in rows for p in row_patches]
        grids = [item.grid for laid, _ in rows for item in laid.items]
        return Batch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            pixel_values=torch.from_numpy(np.concatenate(patches)),
            image_grid_thw=torch.tensor(grids, dtype=torch.long),
            labels=labels,
            tokens=int((labels != IGNORE).sum()),
        )


def _pad_id(chat) -> int:
    token = chat.tokenizer.token_to_id("<|endoftext|>")
    return int(token if token is not None else chat.im_end)


def supervised_logits(model, batch: Batch) -> torch.Tensor:
    """Logits at the supervised positions only, in order (the head is the big matrix: skip the rest)."""
    out = model.model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        pixel_values=batch.pixel_values,
        image_grid_thw=batch.image_grid_thw,
        use_cache=False,
    )
    return model.lm_head(out.last_hidden_state[batch.labels != IGNORE])


def answer_loss(model, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy of the supervised (sampled answer) tokens."""
    import torch.nn.functional as F

    logits = supervised_logits(model, batch)
    return F.cross_entropy(logits.float(), batch.labels[batch.labels != IGNORE])


class StreamingLoss(torch.nn.Module):
    """The model with the loss as its forward, so DDP sees (and synchronises) every call."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.inner = model

    def forward(self, batch: Batch) -> torch.Tensor:
        return answer_loss(self.inner, batch)


# --- data streams -------------------------------------------------------------------------------


def sample_stream(
    config: FinetuneConfig, rank: int, world: int
) -> tuple[Callable[[], Iterator[Sample]], int]:
    """A factory of this rank's samples for one epoch, and the number of samples in an epoch."""
    if config.data == "synthetic":
        from runtime.training.synthetic import synthetic_sample

        total = config.synthetic_samples
        if total < world:
            raise ValueError(f"{total} synthetic samples cannot feed {world} processes")

        def synthetic(epoch: int = 0) -> Iterator[Sample]:
            for index in range(rank, total, world):
                yield synthetic_sample(np.random.default_rng([config.seed, epoch, index]))

        return synthetic, total
    path = Path(config.data)
    total = sum(1 for _ in read_jsonl(path))  # every sample is checked before training starts
    if total == 0:
        raise ValueError(f"{path}: no samples (a JSONL file, one sample per line)")
    if total < world:
        raise ValueError(f"{path}: {total} samples cannot feed {world} processes")

    def from_file(epoch: int = 0) -> Iterator[Sample]:
        order = np.random.default_rng([config.seed, epoch]).permutation(total)
        mine = set(int(i) for i in order[rank::world])
        for index, sample in enumerate(read_jsonl(path)):
            if index in mine:
                yield sample

    return from_file, total


# --- the run ------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    output: Path
    steps: int
    losses: list[float]
    seconds: float


def _trainable(model, config: FinetuneConfig) -> None:
    for name, param in model.named_parameters():
        if ".visual." in f".{name}" or name.startswith("visual."):
            is_merger = ".merger." in name
            param.requires_grad = config.train_merger if is_merger else config.train_vision
        else:
            param.requires_grad = config.train_llm


def finetune(config: FinetuneConfig, out: TextIO | None = None) -> TrainResult:
    """Run the training described by ``config``; rank 0 writes the checkpoint to ``config.output``.

    Under a launcher (``WORLD_SIZE`` > 1) the process group is set up here (NCCL on GPUs, gloo on
    CPU) and always torn down, also when the run fails.
    """
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    owned = world > 1 and not dist.is_initialized()
    if owned:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        return _train(config, out or sys.stdout, world)
    finally:
        if owned and dist.is_initialized():
            dist.destroy_process_group()


def _train(config: FinetuneConfig, out: TextIO, world: int) -> TrainResult:
    import torch.distributed as dist
    import transformers

    rank = int(os.environ.get("RANK", "0"))
    distributed = world > 1
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)

    def say(text: str) -> None:
        if rank == 0:
            print(text, file=out, flush=True)

    info = ModelInfo.load(config.model)
    encoder = Encoder(info, config)
    dtype = torch.float32 if config.dtype == "float32" else torch.bfloat16
    model_class = getattr(transformers, info.architecture)
    say(f"loading {config.model} ({info.architecture}) ...")
    model = model_class.from_pretrained(str(config.model), dtype=dtype, attn_implementation="sdpa")
    _trainable(model, config)
    if config.lora:
        from peft import LoraConfig, get_peft_model

        peft_model = get_peft_model(
            model,
            LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, target_modules=LLM_LORA_TARGETS),
        )
        _trainable_after_lora(model, config)
        trained = peft_model
    else:
        trained = model
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: enable train_llm, train_merger, train_vision or lora")
    loss_module = StreamingLoss(model)
    if distributed:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(loss_module, find_unused_parameters=True)
    else:
        ddp = loss_module
    n_params = sum(p.numel() for p in params)
    accumulation = max(1, config.effective_batch // (config.per_device_batch * world))
    stream, epoch_samples = sample_stream(config, rank, world)
    steps_per_epoch = max(1, epoch_samples // (config.per_device_batch * world * accumulation))
    steps = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))
    vision = [p for name, p in model.named_parameters() if p.requires_grad and "visual" in name]
    others = [p for name, p in model.named_parameters() if p.requires_grad and "visual" not in name]
    groups = [{"params": others}, {"params": vision, "lr": config.lr * config.vision_lr_scale}]
    optimizer = torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=config.lr, weight_decay=config.weight_decay
    )
    scheduler = transformers.get_cosine_schedule_with_warmup(
        optimizer, num_warmup_steps=round(config.warmup * steps), num_training_steps=steps
    )
    say(
        f"training {n_params / 1e6:.2f}M parameters for {steps} steps: {world} process(es) x "
        f"batch {config.per_device_batch} x accumulation {accumulation} = "
        f"{config.per_device_batch * world * accumulation} samples per step; positions={config.positions}, "
        f"mask={config.mask}, K={config.turn_tokens}, lr={config.lr}"
    )
    rng = np.random.default_rng([config.seed, rank, 7])
    epoch = 0
    samples = stream(epoch)
    losses: list[float] = []
    started = time.monotonic()

    def next_samples() -> list[Sample]:
        nonlocal samples, epoch
        batch = []
        while len(batch) < config.per_device_batch:
            try:
                batch.append(next(samples))
            except StopIteration:
                epoch += 1
                samples = stream(epoch)
        return batch

    for step in range(1, steps + 1):
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(accumulation):
            batch = _to(encoder.collate(next_samples(), rng), device)
            sync = micro == accumulation - 1 or not distributed
            context = ddp.no_sync() if not sync else contextlib.nullcontext()
            with context:
                loss = ddp(batch) / accumulation
                loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        if distributed:
            value = torch.tensor([total], device=device)
            dist.all_reduce(value)
            total = float(value) / world
        losses.append(total)
        if rank == 0 and (step % config.log_every == 0 or step == steps or step == 1):
            elapsed = time.monotonic() - started
            eta = elapsed / step * (steps - step)
            recent = np.mean(losses[-config.log_every :])
            say(
                f"step {step}/{steps}  loss {recent:.4f}  lr {scheduler.get_last_lr()[0]:.2e}  "
                f"{elapsed:.0f}s elapsed, ~{eta:.0f}s left"
            )
    if config.lora:
        model = trained.merge_and_unload()
    if rank == 0:
        save_checkpoint(model, config, steps, losses)
        say(f"wrote {config.output}")
    if distributed:
        dist.barrier()
    return TrainResult(config.output, steps, losses, time.monotonic() - started)


def _trainable_after_lora(model, config: FinetuneConfig) -> None:
    """peft freezes every base weight; the merger (and the tower if asked) stay trained in full."""
    for name, param in model.named_parameters():
        if "visual" in name and "lora_" not in name:
            param.requires_grad = config.train_merger if ".merger." in name else config.train_vision


def _to(batch: Batch, device) -> Batch:
    if str(device) == "cpu":
        return batch
    moved = {k: (v.to(device) if hasattr(v, "to") else v) for k, v in asdict(batch).items()}
    return Batch(**moved)


def save_checkpoint(model, config: FinetuneConfig, steps: int, losses: Sequence[float]) -> None:
    """A checkpoint vLLM and transformers load, recording the scheme it was trained for."""
    output = config.output
    output.mkdir(parents=True, exist_ok=True)
    model = model.float() if config.dtype == "float32" else model
    model.eval()
    model.save_pretrained(output, safe_serialization=True)
    copy_checkpoint_files(config.model, output)
    config_file = output / "config.json"
    saved = json.loads(config_file.read_text())
    saved[RECORD_KEY] = trained_record(config, steps, losses)
    config_file.write_text(json.dumps(saved, indent=2))


def copy_checkpoint_files(source: Path, output: Path) -> None:
    """The tokenizer, processor and generation files a saved model needs beside its weights."""
    for name in CHECKPOINT_FILES:
        path = source / name
        if path.exists() and path.resolve() != (output / name).resolve():
            shutil.copy2(path, output / name)


def trained_record(config: FinetuneConfig, steps: int, losses: Sequence[float]) -> dict[str, object]:
    return {
        "positions": config.positions,
        "gap": config.gap,
        "turn_tokens": config.turn_tokens,
        "mask": config.mask,
        "data": config.data if config.data == "synthetic" else Path(config.data).name,
        "steps": steps,
        "final_loss": float(np.mean(losses[-10:])) if losses else None,
        "seed": config.seed,
        **config.extra_record,
    }


def read_record(path: str | os.PathLike) -> dict[str, object] | None:
    """What a checkpoint was trained for (``config.json``'s ``speakwatch`` entry), or None (stock)."""
    config_file = Path(path) / "config.json"
    if not config_file.exists():
        return None
    record = json.loads(config_file.read_text()).get(RECORD_KEY)
    return record if isinstance(record, dict) else None
