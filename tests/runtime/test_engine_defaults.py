"""The engine defaults chosen for the machine: dtype from the processor's features (no engine needed)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from runtime import engine
from runtime.engine import EngineOptions, choose_dtype, cpu_flags, kv_bytes_per_token, resolve_dtype

AVX2 = {"fpu", "sse4_2", "avx", "avx2", "fma", "f16c"}  # these machines (AMD EPYC, KVM)
SAPPHIRE_RAPIDS = AVX2 | {"avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"}


@pytest.mark.parametrize(
    ("device", "flags", "expected"),
    [
        ("cpu", AVX2, "float32"),
        ("cpu", AVX2 | {"avx512f", "avx512bw", "avx512_vnni"}, "float32"),  # AVX-512 without BF16
        ("cpu", AVX2 | {"avx512f", "avx512_bf16"}, "bfloat16"),  # Cooper Lake, Zen 4
        ("cpu", SAPPHIRE_RAPIDS, "bfloat16"),
        ("cpu", {"fp", "asimd", "bf16", "i8mm"}, "bfloat16"),  # AArch64 with BF16 (Graviton 3)
        ("cpu", {"fp", "asimd"}, "float32"),
        ("cpu", set(), "float32"),  # unknown processor
        ("cuda", AVX2, "auto"),
        ("cuda", SAPPHIRE_RAPIDS, "auto"),
    ],
)
def test_choose_dtype(device: str, flags: set[str], expected: str) -> None:
    dtype, reason = choose_dtype(device, frozenset(flags))
    assert dtype == expected
    assert reason


def test_cpu_flags_reads_x86_and_arm_cpuinfo(tmp_path: Path) -> None:
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 fma\n\nprocessor\t: 1\n")
    assert cpu_flags(x86) == {"fpu", "avx2", "fma"}
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\nCPU implementer\t: 0x41\n")
    assert cpu_flags(arm) == {"fp", "asimd", "bf16"}
    assert cpu_flags(tmp_path / "missing") == frozenset()


def test_this_machine_flags_agree_with_torch() -> None:
    """Our reading of /proc/cpuinfo and torch's CPUID test (what vLLM asks) agree about bf16."""
    import torch

    flags = cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo flags here")
    torch_native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    if "avx2" in flags:  # x86
        assert bool({"avx512_bf16", "amx_bf16"} & flags) == torch_native


def test_an_explicit_dtype_always_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine, "engine_device", lambda: "cpu")
    monkeypatch.setattr(engine, "cpu_flags", lambda: frozenset(AVX2))
    assert EngineOptions().dtype is None
    assert resolve_dtype(None) == "float32"
    assert resolve_dtype("bfloat16") == "bfloat16"
    assert resolve_dtype("auto") == "auto"
    monkeypatch.setattr(engine, "cpu_flags", lambda: frozenset(SAPPHIRE_RAPIDS))
    assert resolve_dtype(None) == "bfloat16"
    monkeypatch.setattr(engine, "engine_device", lambda: "cuda")
    assert resolve_dtype(None) == "auto"
    assert resolve_dtype("float32") == "float32"


@pytest.mark.parametrize(
    ("device", "world_size", "expected"),
    [("cpu", 1, "uni"), ("cpu", 2, None), ("cuda", 1, None), ("cuda", 4, None)],
)
def test_choose_executor(device: str, world_size: int, expected: str | None) -> None:
    assert engine.choose_executor(device, world_size) == expected


def test_in_process_threads_leave_a_core_to_the_server() -> None:
    assert [engine.in_process_threads(n) for n in (1, 2, 4, 16)] == [1, 1, 3, 15]


def test_the_in_process_worker_environment_lasts_only_while_the_engine_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)

    with engine._in_process_worker("uni"):
        assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
        assert int(os.environ["OMP_NUM_THREADS"]) >= 1
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in os.environ
    assert "OMP_NUM_THREADS" not in os.environ
    with engine._in_process_worker("mp"):
        assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in os.environ
    monkeypatch.setenv("OMP_NUM_THREADS", "7")  # an explicit value wins, and stays
    with engine._in_process_worker("uni"):
        assert os.environ["OMP_NUM_THREADS"] == "7"
    assert os.environ["OMP_NUM_THREADS"] == "7"


def test_engine_args_fill_in_the_machine_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    from runtime.tiny_model import default_tiny_model

    info = engine.ModelInfo.load(default_tiny_model("qwen2-vl"))
    monkeypatch.setattr(engine, "engine_device", lambda: "cpu")
    monkeypatch.setattr(engine, "cpu_flags", lambda: frozenset(AVX2))
    args = engine.engine_args(info, EngineOptions(positions="sequential"))
    assert (args.dtype, args.distributed_executor_backend) == ("float32", "uni")
    assert args.model_class_overrides and args.hf_overrides["speakwatch_positions"] == "sequential"
    args = engine.engine_args(info, EngineOptions(positions="sequential", dtype="bfloat16", executor="mp"))
    assert (args.dtype, args.distributed_executor_backend) == ("bfloat16", "mp")
    args = engine.engine_args(info, EngineOptions(positions="sequential", tensor_parallel_size=2))
    assert args.distributed_executor_backend is None


def test_serve_passes_an_explicit_dtype_only(monkeypatch: pytest.MonkeyPatch) -> None:
    from runtime import cli

    monkeypatch.delenv("SPEAKWATCH_DTYPE", raising=False)
    options = cli.runtime_kwargs(cli.build_parser().parse_args(["serve"]))["engine_options"]
    assert "dtype" not in options  # None: EngineOptions chooses for the machine
    options = cli.runtime_kwargs(cli.build_parser().parse_args(["serve", "--dtype", "bfloat16"]))
    assert options["engine_options"]["dtype"] == "bfloat16"
    monkeypatch.setenv("SPEAKWATCH_DTYPE", "float32")
    options = cli.runtime_kwargs(cli.build_parser().parse_args(["serve"]))["engine_options"]
    assert options["dtype"] == "float32"


def test_kv_bytes_per_token_counts_keys_and_values_of_every_layer_and_kv_head(tmp_path: Path) -> None:
    text = {"num_hidden_layers": 3, "hidden_size": 256, "num_attention_heads": 8, "num_key_value_heads": 2}
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {**text, "torch_dtype": "bfloat16"}}))
    assert kv_bytes_per_token(tmp_path, "float32") == 2 * 3 * 2 * 32 * 4  # K and V, layers, heads, head_dim
    assert kv_bytes_per_token(tmp_path, "bfloat16") == 2 * 3 * 2 * 32 * 2
    assert kv_bytes_per_token(tmp_path, "auto") == 2 * 3 * 2 * 32 * 2  # the checkpoint's own dtype
    flat = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "head_dim": 32}
    (tmp_path / "config.json").write_text(json.dumps(flat))  # no text_config, no KV heads: one per head
    assert kv_bytes_per_token(tmp_path, "auto") == 2 * 2 * 4 * 32 * 4
    with pytest.raises(ValueError, match="dtype must be one of"):
        kv_bytes_per_token(tmp_path, "int8")
