"""`internvl-fm train-clip DATA --model M`: contrastive fine-tuning of InternVL-C (single process or torchrun)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from internvl_fm.cli_utils import CLIError, new_parser

from .trainer import TrainingArguments


def build_parser() -> argparse.ArgumentParser:
    defaults = TrainingArguments(output_dir="")
    p = new_parser(
        "internvl-fm train-clip",
        "Contrastive (InternVL-C) training on an image-text folder: DATA/metadata.jsonl with one "
        '{"image": "rel/path.png", "text": "..."} per line (optional "captions" and "attributes"). '
        "Run under `torchrun --nproc-per-node N` for DDP. Resumes from the last checkpoint in --output.")
    p.add_argument("data", help="training dataset folder (metadata.jsonl + images)")
    p.add_argument("--model", required=True,
                   help="InternVL-C/G checkpoint folder or hub id, or a config.json to train from scratch")
    p.add_argument("--tokenizer", help="folder with the tokenizer files; if not given: the model folder")
    p.add_argument("--output", "-o", required=True, help="output folder (checkpoints, log.jsonl, final model)")
    p.add_argument("--eval-data", help="held-out dataset folder for recall during training")
    p.add_argument("--steps", type=int, default=defaults.max_steps, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="batch size per process")
    p.add_argument("--lr", type=float, default=defaults.learning_rate, help="peak learning rate (AdamW)")
    p.add_argument("--min-lr-ratio", type=float, default=defaults.min_lr_ratio,
                   help="final learning rate of the cosine schedule, as a fraction of --lr")
    p.add_argument("--warmup", type=int, default=defaults.warmup_steps, help="linear warm-up steps")
    p.add_argument("--schedule", choices=("cosine", "constant"), default=defaults.lr_schedule,
                   help="learning-rate schedule after the warm-up")
    p.add_argument("--weight-decay", type=float, default=defaults.weight_decay,
                   help="AdamW weight decay (not on biases, norms and embeddings)")
    p.add_argument("--max-grad-norm", type=float, default=defaults.max_grad_norm, help="gradient clipping norm")
    p.add_argument("--label-smoothing", type=float, default=defaults.label_smoothing,
                   help="label smoothing of the InfoNCE loss")
    p.add_argument("--no-match-attributes", action="store_true",
                   help="treat only pair i as positive of i even when records share attribute metadata")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations (less memory)")
    p.add_argument("--freeze-vision", action="store_true", help="keep InternViT frozen (clip_projector trains)")
    p.add_argument("--freeze-text", action="store_true", help="keep QLLaMA frozen (text_projection trains)")
    p.add_argument("--lora-vision", type=int, default=0, metavar="RANK", help="LoRA rank on InternViT (needs peft)")
    p.add_argument("--lora-text", type=int, default=0, metavar="RANK", help="LoRA rank on QLLaMA (needs peft)")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha; if not given: 2 x rank")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA input")
    p.add_argument("--seed", type=int, default=defaults.seed,
                   help="seed of the init, the sample order and the caption picks")
    p.add_argument("--workers", type=int, default=defaults.num_workers, help="data-loader worker processes")
    p.add_argument("--save-steps", type=int, default=defaults.save_steps,
                   help="write OUTPUT/checkpoint-N every N steps (0: only at the last step)")
    p.add_argument("--save-total-limit", type=int, default=defaults.save_total_limit,
                   help="keep only the newest N checkpoints")
    p.add_argument("--log-steps", type=int, default=defaults.logging_steps,
                   help="log to OUTPUT/log.jsonl every N steps")
    p.add_argument("--eval-steps", type=int, default=defaults.eval_steps,
                   help="recall on --eval-data every N steps and at the end (0: never)")
    p.add_argument("--eval-size", type=int, default=defaults.eval_size, help="images of --eval-data used")
    p.add_argument("--cache-images", action="store_true",
                   help="decode every training image once into memory (N x 3 x S x S bytes)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads; if not given: torch's default")
    p.add_argument("--no-resume", action="store_true", help="start fresh even if --output has checkpoints")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _check_data(flag: str, folder: str) -> None:
    """A dataset folder without metadata.jsonl fails before the model is loaded."""
    path = Path(folder)
    if not (path / "metadata.jsonl").is_file() and not (path.is_file() and path.suffix == ".jsonl"):
        raise CLIError(f"{flag} {folder}: no metadata.jsonl there (a folder with metadata.jsonl and the images)")


def main(argv: list[str] | None = None) -> int:
    """Contrastive fine-tuning of InternVL-C on image-text pairs (one process, or torchrun for DDP)."""
    from .data import DatasetFormatError
    from .trainer import TrainingError, train_clip

    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    _check_data("DATA", args.data)
    if args.eval_data is not None:
        _check_data("--eval-data", args.eval_data)
    try:
        training_args = _training_arguments(args)
    except ValueError as err:  # option values / combinations TrainingArguments refuses
        raise CLIError(str(err)) from None
    try:
        history = train_clip(args.model, args.data, training_args, eval_data=args.eval_data,
                             tokenizer=args.tokenizer, resume=not args.no_resume)
    except (DatasetFormatError, TrainingError) as err:  # bad records, no tokenizer, not an InternVL-C/G model...
        raise CLIError(str(err)) from None
    last_eval = next((h["eval"] for h in reversed(history) if "eval" in h), None)
    summary = {"output": args.output, "steps": training_args.max_steps,
               "final_loss": next((h["loss"] for h in reversed(history) if "loss" in h), None)}
    if last_eval is not None:
        summary["t2i"] = last_eval["t2i"]
        summary["per_language_t2i_r@5"] = {k: v["t2i"]["r@5"] for k, v in last_eval["per_language"].items()}
    print(json.dumps(summary, indent=2))
    return 0


def _training_arguments(args: argparse.Namespace) -> TrainingArguments:
    return TrainingArguments(
        output_dir=args.output, max_steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr,
        min_lr_ratio=args.min_lr_ratio, warmup_steps=args.warmup, lr_schedule=args.schedule,
        weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, label_smoothing=args.label_smoothing,
        match_attributes=not args.no_match_attributes, bf16=args.bf16,
        gradient_checkpointing=args.gradient_checkpointing, freeze_vision=args.freeze_vision,
        freeze_text=args.freeze_text, lora_vision_rank=args.lora_vision, lora_text_rank=args.lora_text,
        lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, seed=args.seed, num_workers=args.workers,
        save_steps=args.save_steps, save_total_limit=args.save_total_limit, logging_steps=args.log_steps,
        eval_steps=args.eval_steps, eval_size=args.eval_size, cache_images=args.cache_images, num_threads=args.threads,
        progress=not args.no_progress)


__all__ = ["build_parser", "main"]
