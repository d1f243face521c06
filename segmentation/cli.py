"""`internvl-fm segment`, `internvl-fm seg-train`, `internvl-fm seg-eval`."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from internvl_fm.cli_utils import DEVICE_HELP, CLIError, new_parser, resolve_device

MODEL_HELP = "a trained segmentation model folder (e.g. WORK_DIR/final, written by seg-train)"


def _save_png(image, path: Path) -> None:
    from internvl_fm.loading import atomic_write

    with atomic_write(path) as tmp:
        image.save(tmp, format="PNG")


def mask_image(mask, palette: list[list[int]] | None, num_classes: int):
    """The mask as a PNG-ready image whose pixel values are the class ids (palette mode when they fit a byte)."""
    import numpy as np
    from PIL import Image

    from .data import default_palette

    array = np.asarray(mask)
    if num_classes > 256:
        return Image.fromarray(array.astype(np.uint16), mode="I;16")
    image = Image.fromarray(array.astype(np.uint8), mode="P")
    colours = palette or default_palette(num_classes)
    image.putpalette([c for colour in colours[:256] for c in colour])
    return image


def segment_main(argv: list[str]) -> int:
    """Segment images with a trained model: writes OUTPUT/<stem>_mask.png (class ids) and <stem>_overlay.png."""
    parser = new_parser("internvl-fm segment", segment_main.__doc__)
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image file(s)")
    parser.add_argument("--model", "--checkpoint", dest="model", required=True, help=MODEL_HELP)
    parser.add_argument("--output", "--out", dest="output", required=True, help="output folder")
    parser.add_argument("--mode", choices=("slide", "whole"), default="slide",
                        help="slide: overlapping crop windows, logits averaged; whole: one pass over the image")
    parser.add_argument("--crop", type=int, default=None,
                        help="sliding-window / resize size; if not given: the model's training crop")
    parser.add_argument("--stride", type=int, default=None, help="sliding-window stride; if not given: 2/3 of the crop")
    parser.add_argument("--alpha", type=float, default=0.5, help="weight of the mask colours in the overlay")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    args = parser.parse_args(argv)

    from PIL import Image

    from .data import read_image
    from .infer import overlay, segment_image
    from .modeling import SegmentationModel

    missing = [path for path in args.images if not Path(path).is_file()]
    if missing:
        raise CLIError(f"image file(s) not found: {', '.join(missing)}")
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--output {out} is a file, not a folder")
    model = SegmentationModel.from_pretrained(args.model, device=resolve_device(args.device))
    config = model.config
    out.mkdir(parents=True, exist_ok=True)
    for path in args.images:
        image = read_image(path)
        mask = segment_image(model, image, mode=args.mode, crop_size=args.crop, stride=args.stride)
        pil = Image.fromarray(image.permute(1, 2, 0).numpy())
        stem = Path(path).stem
        _save_png(mask_image(mask, config.palette, config.num_classes), out / f"{stem}_mask.png")
        _save_png(overlay(pil, mask, config.palette, config.num_classes, args.alpha), out / f"{stem}_overlay.png")
        present = sorted(set(mask.unique().tolist()))
        names = [config.class_names[i] if config.class_names else str(i) for i in present]
        print(json.dumps({"image": str(path), "mask": str(out / f"{stem}_mask.png"),
                          "overlay": str(out / f"{stem}_overlay.png"), "classes": names}))
    return 0


def _common_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="recipe file (YAML or JSON), e.g. segmentation/configs/linear_frozen.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value (repeatable), e.g. --set train.max_iters=1000")


def train_main(argv: list[str]) -> int:
    """Train a segmentation model from a recipe (run under torchrun for several GPUs)."""
    parser = new_parser("internvl-fm seg-train", train_main.__doc__)
    _common_config_args(parser)
    parser.add_argument("--work-dir", default=None, help="overrides train.work_dir")
    parser.add_argument("--no-resume", action="store_true", help="start over even if the work dir has checkpoints")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    from .train import load_train_config, train

    overrides = list(args.overrides) + ([f"train.work_dir={args.work_dir}"] if args.work_dir else [])
    config = load_train_config(args.config, overrides)
    result = train(config, resume=not args.no_resume, progress=not args.quiet)
    summary = {"step": result.step, "final": str(result.final_dir) if result.final_dir else None}
    if result.history:
        summary["last_loss"] = result.history[-1]["loss"]
    if result.metrics:
        summary.update({k: result.metrics[k] for k in ("mIoU", "mAcc", "aAcc")})
    if int(os.environ.get("RANK", "0")) == 0:  # one summary under torchrun
        print(json.dumps(summary))
    return 0


def eval_main(argv: list[str]) -> int:
    """Evaluate a model on the validation set of a recipe: mIoU, mAcc, aAcc and per-class IoU (JSON)."""
    parser = new_parser("internvl-fm seg-eval", eval_main.__doc__)
    _common_config_args(parser)
    parser.add_argument("--model", "--checkpoint", dest="model", required=True, help=MODEL_HELP)
    parser.add_argument("--mode", choices=("slide", "whole"), default=None, help="if not given: train.eval_mode")
    parser.add_argument("--stride", type=int, default=None,
                        help="if not given: train.eval_stride, or 2/3 of model.crop_size")
    parser.add_argument("--output", "--out", dest="output", default=None, help="also write the metrics JSON here")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    args = parser.parse_args(argv)

    from internvl_fm.loading import atomic_write

    from .infer import evaluate
    from .modeling import SegmentationModel
    from .train import build_datasets, load_train_config

    config = load_train_config(args.config, args.overrides)
    model = SegmentationModel.from_pretrained(args.model, device=resolve_device(args.device))
    _, val_set = build_datasets(config, model.patch_size)
    if val_set is None:
        raise CLIError(f"{args.config} names no validation set (data.val_split / data.val_images)")
    result = evaluate(model, val_set, args.mode or config.train.eval_mode, config.model.crop_size,
                      args.stride or config.train.eval_stride)
    metrics = result.to_dict(model.config.class_names)
    text = json.dumps(metrics, indent=2)
    if args.output:
        with atomic_write(args.output) as tmp:
            Path(tmp).write_text(text + "\n")
    print(text)
    return 0
