"""``speakwatch finetune``: the command line of runtime/training/finetune.py.

Every knob of `FinetuneConfig` is an option (defaults: the paper's recipe). Run it alone, or under a
launcher for several processes: ``torchrun --nproc-per-node 4 -m runtime.cli finetune ...`` or
``accelerate launch -m runtime.cli finetune ...``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import positional


def add_finetune_parser(commands: argparse._SubParsersAction) -> None:
    from runtime.training.finetune import MASKS, FinetuneConfig

    parser = commands.add_parser(
        "finetune",
        help="fine-tune a Qwen2-VL / Qwen2.5-VL checkpoint for a position scheme on streaming samples",
        description=(
            "Fine-tune a checkpoint on samples laid out exactly as a live session sends them to vLLM. "
            "DATA is a JSONL file (format: runtime/training/data.py, docs/training.md) or 'synthetic' "
            "(the built-in shapes task). Defaults follow the paper's recipe."
        ),
    )
    defaults = FinetuneConfig(model=".", output=".")
    parser.add_argument("model", metavar="MODEL", nargs="?", help="checkpoint directory to start from")
    parser.add_argument("output", metavar="OUT", help="where the fine-tuned checkpoint is written")
    parser.add_argument("--data", default=defaults.data, help="JSONL file or 'synthetic' (default)")
    parser.add_argument("--positions", choices=positional.SCHEMES, default=defaults.positions)
    parser.add_argument("--gap", type=int, default=defaults.gap, help="gap-isolated's output offset")
    parser.add_argument(
        "--turn-tokens", type=int, default=defaults.turn_tokens, help="K: answer tokens per turn"
    )
    parser.add_argument(
        "--mask",
        choices=MASKS,
        default=defaults.mask,
        help="served: causal in arrival order, as vLLM serves (default); paper: frames never see answer text",
    )
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--warmup", type=float, default=defaults.warmup, help="fraction of the steps")
    parser.add_argument("--epochs", type=float, default=defaults.epochs)
    parser.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    parser.add_argument("--synthetic-samples", type=int, default=defaults.synthetic_samples)
    parser.add_argument("--per-device-batch", type=int, default=defaults.per_device_batch)
    parser.add_argument("--effective-batch", type=int, default=defaults.effective_batch)
    parser.add_argument("--train-vision", action="store_true", help="train the vision tower too")
    parser.add_argument(
        "--vision-lr-scale", type=float, default=defaults.vision_lr_scale, help="vision tower lr / --lr"
    )
    parser.add_argument("--freeze-merger", action="store_true", help="do not train the vision merger")
    parser.add_argument("--freeze-llm", action="store_true", help="do not train the language model")
    parser.add_argument("--lora", action="store_true", help="LoRA (peft) on the language model")
    parser.add_argument("--lora-rank", type=int, default=defaults.lora_rank)
    parser.add_argument("--lora-alpha", type=int, default=defaults.lora_alpha)
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--max-length", type=int, default=defaults.max_length)
    parser.add_argument("--pixel-budget", type=int, help="resize frames to at most this many pixels")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=defaults.dtype)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--log-every", type=int, default=defaults.log_every)
    parser.add_argument("--threads", type=int, help="torch CPU threads per process")
    parser.add_argument(
        "--builtin",
        action="store_true",
        help="reproduce the built-in watching checkpoint: its recipe, to OUT (only --threads applies)",
    )
    parser.add_argument(
        "--evaluate",
        type=int,
        default=0,
        metavar="N",
        help="afterwards, held-out accuracy on N shapes scenes",
    )


def run_finetune(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from runtime.training.data import DataError
    from runtime.training.finetune import FinetuneConfig, finetune

    try:
        if args.builtin:
            from runtime.training.builtin import train_builtin

            if args.model is not None:
                parser.error("finetune --builtin takes only OUT (the base checkpoint is generated)")
            output = train_builtin(args.output, threads=args.threads)
        else:
            if args.model is None:
                parser.error("finetune needs MODEL and OUT (or --builtin OUT)")
            fields = {f.name for f in dataclasses.fields(FinetuneConfig)}
            values = {k: v for k, v in vars(args).items() if k in fields and v is not None}
            values.update(
                model=args.model,
                output=args.output,
                train_merger=not args.freeze_merger,
                train_llm=not args.freeze_llm,
            )
            config = FinetuneConfig(**values)
            output = finetune(config).output
    except (DataError, ValueError, FileNotFoundError) as exc:
        print(f"speakwatch finetune: {exc}", file=sys.stderr)
        return 2
    if args.evaluate:
        import os

        if int(os.environ.get("RANK", "0")) == 0:
            from runtime.training.evaluate import checkpoint_accuracy

            acc = checkpoint_accuracy(output, args.evaluate)
            print(
                f"held-out accuracy on {acc.n} scenes: colour {acc.color:.0%}, shape {acc.shape:.0%}, "
                f"colour+shape {acc.both:.0%}",
                flush=True,
            )
    return 0
