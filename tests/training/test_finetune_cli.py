"""`speakwatch finetune` as users run it: under torchrun with two CPU processes (gloo), with LoRA,
and with bad data (a clear error naming the sample and field, exit status 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file

from runtime.tiny_model import make_tiny_model

pytestmark = pytest.mark.timeout(600)

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("base") / "tiny", vocab="task", size="tiny")


def _weights(path: Path) -> dict[str, torch.Tensor]:
    """Parameters as transformers names them (the file may use the older key names)."""
    model = transformers.Qwen2VLForConditionalGeneration.from_pretrained(str(path))
    return {name: param.detach() for name, param in model.named_parameters()}


def _run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run(args, capture_output=True, text=True, timeout=400, env=env, **kwargs)


def test_torchrun_trains_with_two_cpu_processes(base: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    done = _run(
        [
            str(BIN / "torchrun"), "--nproc-per-node", "2", "-m", "runtime.cli", "finetune",
            str(base), str(out),
            "--lr", "1e-3", "--max-steps", "3", "--per-device-batch", "1", "--effective-batch", "4",
            "--threads", "1", "--positions", "gap-isolated",
        ]
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es) x batch 1 x accumulation 2 = 4 samples per step" in done.stdout
    assert done.stdout.count("step 3/3") == 1, "only rank 0 reports"
    record = json.loads((out / "config.json").read_text())["speakwatch"]
    assert record["positions"] == "gap-isolated" and record["steps"] == 3
    trained, before = _weights(out), _weights(base)
    key = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(trained[key], before[key]), "the language model must have been trained"


def test_lora_merges_into_a_plain_checkpoint(base: Path, tmp_path: Path) -> None:
    out = tmp_path / "lora"
    done = _run(
        [
            str(BIN / "speakwatch"), "finetune", str(base), str(out), "--lora", "--lora-rank", "4",
            "--lr", "1e-2", "--max-steps", "2", "--per-device-batch", "2", "--effective-batch", "2",
        ]
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert not any("lora" in key for key in load_file(str(out / "model.safetensors"))), "adapters are merged"
    weights, before = _weights(out), _weights(base)
    key = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(weights[key], before[key]), "merged adapters change the base weights"
    vision = "model.visual.blocks.0.attn.qkv.weight"
    assert torch.equal(weights[vision], before[vision]), "the vision tower stays frozen by default"


def test_bad_data_names_the_sample_and_field(base: Path, tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    (tmp_path / "frames").mkdir()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "frames" / "0000.png")
    good = {"id": "ok", "frames": "frames", "exchanges": [{"at": 0, "question": "Q?", "answer": "a"}]}
    bad = {"id": "clip-2", "frames": "frames", "exchanges": [{"at": 1.0, "question": "Q?", "answer": 3}]}
    data.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    done = _run([str(BIN / "speakwatch"), "finetune", str(base), str(tmp_path / "out"), "--data", str(data)])
    assert done.returncode == 2
    assert "train.jsonl line 2 (id 'clip-2'): exchanges[0]: field 'answer'" in done.stderr, done.stderr
    assert "step " not in done.stdout, "data is checked before training starts"


def test_builtin_takes_no_model(tmp_path: Path) -> None:
    done = _run([str(BIN / "speakwatch"), "finetune", "--builtin", "a", "b"])
    assert done.returncode == 2 and "--builtin takes only OUT" in done.stderr
