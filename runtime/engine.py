"""Building the vLLM engine with speakwatch's position schemes installed.

One `AsyncLLM` serves every session of a runtime. The engine core runs in its own process (vLLM
always does this); the position scheme reaches it through the model config (``hf_overrides``) and
our model classes through ``model_class_overrides``, which vLLM re-applies in every process.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import positional
from runtime.admission import KVCapacity
from runtime.chat import ChatFormat

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess

    from vllm.v1.engine.async_llm import AsyncLLM

log = logging.getLogger("speakwatch.engine")

SUPPORTED_ARCHITECTURES = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")

# CPU features that compute bfloat16 natively (x86 AVX512-BF16 / AMX-BF16, AArch64 BF16): what vLLM's
# CPU backend itself tests (torch.cpu._is_avx512_bf16_supported, _is_amx_tile_supported, "bf16").
# Without one, bfloat16 is emulated through float32 and decodes ~1.4x slower than float32 itself.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
DTYPE_BITS = {"float32": 32, "bfloat16": 16, "float16": 16, "half": 16, "float": 32}


def choose_dtype(device: str, cpu_flags: frozenset[str] | set[str] | None = None) -> tuple[str, str]:
    """The dtype to serve on ``device`` ("cpu", "cuda", ...) given the CPU's feature flags, and why.

    Pure: flags in, ``(dtype, reason)`` out. Accelerators keep vLLM's "auto" (the checkpoint's own
    dtype); a CPU gets bfloat16 only where it has native bf16 arithmetic, float32 otherwise.
    """
    if device != "cpu":
        return "auto", f"{device}: vLLM's choice from the checkpoint"
    native = sorted(NATIVE_BF16_FLAGS & set(cpu_flags or ()))
    if native:
        return "bfloat16", f"cpu with native bfloat16 ({', '.join(native)})"
    return "float32", "cpu without native bfloat16 (no avx512_bf16/amx_bf16): bfloat16 would be emulated"


def cpu_flags(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> frozenset[str]:
    """The first processor's feature flags (x86 ``flags``, AArch64 ``Features``); empty if unknown."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return frozenset(value.split())
    return frozenset()


def engine_device() -> str:
    """The device vLLM will run on ("cpu", "cuda", ...), as its platform detection sees it."""
    from vllm.platforms import current_platform

    return str(current_platform.device_type or "cpu")


def choose_executor(device: str, world_size: int) -> str | None:
    """vLLM's executor backend for this machine: "uni" on a CPU with one worker, else vLLM's choice.

    With "mp" (what the CPU build otherwise forces), the engine core and its worker are two processes
    that wait for each other in a shared-memory queue whose reader spins (``sched_yield``) for 1 s
    after every message: the worker spins while a camera streams, the engine core while it answers,
    a whole core on a 2-core machine. "uni" runs the model inside the engine-core process: no queue.
    """
    return "uni" if device == "cpu" and world_size == 1 else None


def resolve_dtype(requested: str | None) -> str:
    """``requested`` if given (an explicit value always wins), else the choice for this machine."""
    if requested is not None:
        log.info("serving dtype %s (asked for)", requested)
        return requested
    dtype, reason = choose_dtype(engine_device(), cpu_flags())
    log.info("serving dtype %s: %s", dtype, reason)
    return dtype


@dataclass(frozen=True)
class ModelInfo:
    """What the runtime needs to know about a checkpoint, read from its directory alone."""

    path: Path
    architecture: str
    hidden_size: int
    max_position_embeddings: int
    spatial_merge_size: int
    patch_size: int
    temporal_patch_size: int
    tokens_per_second: float
    chat: ChatFormat
    trained_for: dict[str, Any] | None = None  # config.json's "speakwatch" record (`speakwatch finetune`)

    @property
    def default_positions(self) -> str:
        """The scheme the checkpoint was fine-tuned for; stock checkpoints know only native numbering."""
        record = self.trained_for or {}
        scheme = record.get("positions")
        return scheme if scheme in positional.SCHEMES else "sequential"

    @property
    def trained_turn_tokens(self) -> int | None:
        value = (self.trained_for or {}).get("turn_tokens")
        return int(value) if isinstance(value, int) and value >= 1 else None

    def positions_for(self, requested: str | None) -> str:
        """The scheme to serve: ``requested``, or the checkpoint's own; warns when they differ."""
        scheme = requested or self.default_positions
        if scheme not in positional.SCHEMES:
            raise ValueError(
                f"unknown position scheme {scheme!r}; choose one of {', '.join(positional.SCHEMES)}"
            )
        if scheme != self.default_positions:
            trained = "was fine-tuned for" if self.trained_for else "is a stock checkpoint, trained with"
            log.warning(
                "serving %s with %s positions, but it %s %s positions: expect worse answers "
                "(fine-tune it for %s with `speakwatch finetune`)",
                self.path,
                scheme,
                trained,
                self.default_positions,
                scheme,
            )
        return scheme

    @classmethod
    def load(cls, path: str | os.PathLike) -> ModelInfo:
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.exists():
            raise FileNotFoundError(f"{path} is not a model directory (no config.json)")
        config = json.loads(config_file.read_text())
        architecture = (config.get("architectures") or ["?"])[0]
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"{path}: architecture {architecture!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        text = config.get("text_config") or config
        vision = config.get("vision_config") or {}
        hidden = int(text.get("hidden_size") or config["hidden_size"])
        return cls(
            path=path,
            architecture=architecture,
            hidden_size=hidden,
            max_position_embeddings=int(text.get("max_position_embeddings", 32768)),
            spatial_merge_size=int(vision.get("spatial_merge_size", 2)),
            patch_size=int(vision.get("patch_size", 14)),
            temporal_patch_size=int(vision.get("temporal_patch_size", 2)),
            tokens_per_second=float(vision.get("tokens_per_second", 1.0)),
            chat=ChatFormat.from_pretrained(path),
            trained_for=config.get("speakwatch") if isinstance(config.get("speakwatch"), dict) else None,
        )


@dataclass(frozen=True)
class EngineOptions:
    """Engine settings that matter for a speakwatch server; ``extra`` passes anything else to vLLM."""

    positions: str | None = None  # None: the scheme the checkpoint was trained for (sequential if stock)
    gap: int = positional.DEFAULT_GAP
    max_model_len: int = 8192
    kv_cache_gb: float = 1.0
    dtype: str | None = None  # None: chosen for this machine (choose_dtype); an explicit value wins
    max_num_seqs: int = 16
    # vLLM distributed_executor_backend; None: "uni" on a CPU with one worker (choose_executor)
    executor: str | None = None
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    enforce_eager: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.positions is not None and self.positions not in positional.SCHEMES:
            raise ValueError(
                f"unknown position scheme {self.positions!r}; choose one of {', '.join(positional.SCHEMES)}"
            )
        if self.max_model_len < 256:
            raise ValueError(f"max_model_len must be at least 256, got {self.max_model_len}")
        if self.kv_cache_gb <= 0:
            raise ValueError(f"kv_cache_gb must be positive, got {self.kv_cache_gb}")


def engine_args(info: ModelInfo, options: EngineOptions):
    """vLLM `AsyncEngineArgs` for a checkpoint with our model classes and scheme installed."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    from runtime.vllm_models import MODEL_CLASS_OVERRIDES

    if options.positions is None:
        raise ValueError(
            "EngineOptions.positions must be resolved (ModelInfo.positions_for) before the engine starts"
        )
    hf_overrides = {
        "speakwatch_positions": options.positions,
        "speakwatch_gap": options.gap,
        "speakwatch_assistant_header": list(info.chat.assistant_header),
        "speakwatch_im_end": info.chat.im_end,
    }
    world_size = options.tensor_parallel_size * options.pipeline_parallel_size * options.data_parallel_size
    kwargs: dict[str, Any] = dict(
        model=str(info.path),
        tokenizer=str(info.path),
        model_class_overrides=dict(MODEL_CLASS_OVERRIDES),
        hf_overrides=hf_overrides,
        enable_mm_embeds=True,
        max_model_len=options.max_model_len,
        kv_cache_memory_bytes=int(options.kv_cache_gb * 2**30),
        dtype=options.dtype if options.dtype is not None else resolve_dtype(None),
        distributed_executor_backend=options.executor or choose_executor(engine_device(), world_size),
        enforce_eager=options.enforce_eager,
        max_num_seqs=options.max_num_seqs,
        tensor_parallel_size=options.tensor_parallel_size,
        pipeline_parallel_size=options.pipeline_parallel_size,
        data_parallel_size=options.data_parallel_size,
        limit_mm_per_prompt={"image": 16, "video": 0},
        enable_prefix_caching=True,
        # we pass embeddings, never raw images: no HF processor cache, no encoder profiling run
        mm_processor_cache_gb=0,
        skip_mm_profiling=True,
        disable_log_stats=True,
    )
    kwargs.update(options.extra)
    return AsyncEngineArgs(**kwargs)


def configure_process_environment(kv_cache_gb: float) -> None:
    """Offline operation before vLLM is imported; a word when the KV budget will not be ``kv_cache_gb``.

    The budget itself goes to vLLM as ``kv_cache_memory_bytes`` (`engine_args`), which the CPU build
    honours to the byte unless ``VLLM_CPU_KVCACHE_SPACE`` is set: that variable (whole GiB) overrides
    it, so it is left to the user (setting it here would round 0.25 GiB up to 1 and, set once, stick
    for every later engine of the process). The engine's real capacity is read back after start-up
    (`kv_capacity`), whichever won.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    space = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "")
    if space:
        log.warning("VLLM_CPU_KVCACHE_SPACE=%s GiB overrides kv_cache_gb=%s (CPU build)", space, kv_cache_gb)


def kv_bytes_per_token(model: str | os.PathLike, dtype: str) -> int:
    """Bytes of keys and values one token takes in the KV cache of the checkpoint at ``model``
    (every language layer, every KV head) in ``dtype`` ("auto": the checkpoint's): what sizes a
    cache for a number of blocks."""
    config = json.loads((Path(model) / "config.json").read_text())
    text = config.get("text_config") or config
    if dtype == "auto":  # vLLM's "auto": the checkpoint's own dtype
        dtype = str(text.get("torch_dtype") or config.get("torch_dtype") or "float32")
    if dtype not in DTYPE_BITS:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPE_BITS)}, got {dtype!r}")
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    heads = text.get("num_key_value_heads") or text["num_attention_heads"]
    return 2 * text["num_hidden_layers"] * heads * head_dim * DTYPE_BITS[dtype] // 8


def kv_capacity(engine: AsyncLLM) -> KVCapacity | None:
    """The KV cache a started engine gives requests: vLLM's ``num_gpu_blocks`` (set from the engine
    core's start-up reply, after it sized the cache) less the blocks vLLM keeps for itself; None
    when the engine reports none. One block pool for every layer: the supported architectures have
    one full-attention KV group, so ``blocks x block_size`` tokens is what requests can hold."""
    config = getattr(engine, "vllm_config", None)
    cache = getattr(config, "cache_config", None)
    blocks, size = getattr(cache, "num_gpu_blocks", None), getattr(cache, "block_size", None)
    if not isinstance(blocks, int) or not isinstance(size, int) or blocks < 1 or size < 1:
        return None
    watermark = float(getattr(getattr(config, "scheduler_config", None), "watermark", 0.0) or 0.0)
    return KVCapacity.from_engine(blocks, size, watermark)


def in_process_threads(cpus: int) -> int:
    """Torch threads for a model run inside the engine-core process: one core left to the serving
    process (event loop, vision encoder), as vLLM's "mp" layout leaves one to its scheduler."""
    return max(1, cpus - 1)


@contextlib.contextmanager
def _in_process_worker(backend: str | None) -> Iterator[None]:
    """While the engine is configured and spawned: let the CPU build keep the "uni" executor, and
    size the engine process's OpenMP pool.

    vLLM's CPU platform turns "uni" back into "mp" unless ``VLLM_ENABLE_V1_MULTIPROCESSING=0``; for
    `AsyncLLM` that variable changes nothing else (its engine core is always its own process). With
    "uni" vLLM sizes no thread pool: torch would take every core, and its OpenMP threads then wait
    on each other and on our process (a decode 8x slower on 2 busy cores). Both variables are set
    only while the engine starts (the spawned process keeps them) and an explicit value wins.
    """
    if backend != "uni":
        yield
        return
    chosen = {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "OMP_NUM_THREADS": str(in_process_threads(len(os.sched_getaffinity(0)))),
    }
    multiprocessing = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if multiprocessing != "0":
        log.warning("VLLM_ENABLE_V1_MULTIPROCESSING=%s: CPU build keeps a worker process", multiprocessing)
    added = [name for name in chosen if name not in os.environ]
    for name in added:
        os.environ[name] = chosen[name]
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def engine_processes(engine: AsyncLLM) -> list[BaseProcess]:
    """The engine-core processes of a started `AsyncLLM` (one here; one per DP rank): what dies when
    the engine does. Empty for an engine whose processes vLLM does not manage (Ray, external)."""
    resources = getattr(getattr(engine, "engine_core", None), "resources", None)
    processes = getattr(getattr(resources, "engine_manager", None), "processes", None)
    return list(processes) if isinstance(processes, list) else []


def engine_pids(engine: AsyncLLM) -> list[int]:
    """The process ids of the engine core (for logs, and for tests that kill it)."""
    return [proc.pid for proc in engine_processes(engine) if proc.pid is not None]


def exit_reason(name: str, pid: int | None, exitcode: int) -> str:
    """How a process ended, for people: its exit code, or the signal that killed it."""
    if exitcode < 0:
        try:
            how = f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            how = f"killed by signal {-exitcode}"
    else:
        how = f"exited with code {exitcode}"
    return f"the engine core process {name} (pid {pid}) {how}"


def engine_failure(engine: AsyncLLM) -> str | None:
    """Why ``engine`` cannot serve any more, or None while it can. Cheap (no I/O): polled on the loop.

    vLLM marks its client dead (``errored``: the engine core's monitor thread saw the process go,
    or the output handler stopped) and then raises `EngineDeadError` in every request; an exited
    engine-core process is checked too, in case the flag is not set yet.
    """
    for proc in engine_processes(engine):
        code = proc.exitcode
        if code is not None:
            return exit_reason(proc.name, proc.pid, code)
    if engine.errored:
        return "the engine core is dead (vLLM EngineDeadError)"
    return None


def stop_engine(engine: AsyncLLM) -> None:
    """Shut an engine down, dead or alive (blocking: run it off the event loop)."""
    engine.shutdown()


def build_async_llm(info: ModelInfo, options: EngineOptions):
    """Start a vLLM `AsyncLLM` (blocking: seconds to minutes; run it off the event loop)."""
    configure_process_environment(options.kv_cache_gb)
    from vllm.v1.engine.async_llm import AsyncLLM

    args = engine_args(info, options)
    log.info(
        "starting vLLM engine for %s (%s, positions=%s, dtype=%s, executor=%s)",
        info.path,
        info.architecture,
        options.positions,
        args.dtype,
        args.distributed_executor_backend,
    )
    with _in_process_worker(args.distributed_executor_backend):
        return AsyncLLM.from_engine_args(args)
