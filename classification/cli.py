"""`internvl-fm classify`, `internvl-fm eval zeroshot` and `internvl-fm probe train|eval`."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from internvl_fm.errors import InternVLError

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint folder or hub id (InternVL-14B-224px layout)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="weights dtype (default: as stored; use bfloat16 on CPU, never float16)")


def _load_model(args: argparse.Namespace, *, need_text: bool = True):
    from internvl_fm.loading import load

    from .errors import ClassificationError

    model = load(args.model, dtype=args.dtype, device=args.device)
    if need_text and not hasattr(model, "encode_text"):
        raise ClassificationError(f"{args.model} is a {type(model).__name__}: zero-shot needs an InternVL-C/G "
                                  "checkpoint (InternVLModel)")
    return model


def _read_list(value: str | None) -> list[str] | None:
    """A JSON list file, or a comma-separated string."""
    if value is None:
        return None
    path = Path(value)
    if path.suffix == ".json" and path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, list):
            from .errors import ClassificationError

            raise ClassificationError(f"{path} must hold a JSON list of strings")
        return data
    return [item.strip() for item in value.split(",")] if value.strip() else []


def _run(main, argv: list[str], prog: str) -> int:
    try:
        return main(argv)
    except (InternVLError, ValueError, FileNotFoundError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2


# ------------------------------------------------------------------------------------------------------ classify


def classify_main(argv: list[str]) -> int:
    """Zero-shot classify images (or video clips) against comma-separated labels, or ImageNet-1K by default."""
    return _run(_classify, argv, "internvl-fm classify")


def _classify(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="internvl-fm classify", description=classify_main.__doc__)
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (or video files: frames averaged)")
    parser.add_argument("--labels", default=None,
                        help='"cat,dog,..." or a JSON list file (default: ImageNet-1K classnames in --lang)')
    parser.add_argument("--lang", default="en", help="language of labels/templates: en, zh, ja, ar, it")
    parser.add_argument("--templates", default=None,
                        help="a JSON list file or 'tpl1,tpl2' with {c} (default: the bundled ones of --lang)")
    parser.add_argument("--mode", default="InternVL-C", choices=["InternVL-C", "InternVL-G"])
    parser.add_argument("--top-k", type=int, default=None,
                        help="labels shown per image (default: all given labels, or 5 for ImageNet)")
    parser.add_argument("--num-frames", type=int, default=8, help="frames sampled per video (paper: 1 or 8)")
    parser.add_argument("--cache-dir", default=None, help="cache the text classifier here (safetensors)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per input instead of text")
    _add_model_args(parser)
    args = parser.parse_args(argv)

    from .prompts import normalize_language
    from .zeroshot import ZeroShotClassifier

    language = normalize_language(args.lang)
    labels = _read_list(args.labels)
    templates = _read_list(args.templates)
    model = _load_model(args)
    clf = ZeroShotClassifier.from_classnames(model, labels, templates, language=language, mode=args.mode,
                                             cache_dir=args.cache_dir, progress=labels is None)
    top_k = args.top_k or (clf.num_classes if labels is not None else 5)
    for source in args.images:
        if Path(source).suffix.lower() in VIDEO_EXTENSIONS:
            pred = clf.predict_video(source, num_frames=args.num_frames, top_k=top_k)
        else:
            pred = clf.predict([source], top_k=top_k)[0]
        if args.json:
            print(json.dumps({"input": source, "labels": pred.labels, "probs": pred.probs}, ensure_ascii=False))
        else:
            print(source)
            for label, prob in pred:
                print(f"  {prob:8.4f}  {label}")
    return 0


# ------------------------------------------------------------------------------------------------------ eval


def _add_data_args(parser: argparse.ArgumentParser, split: str) -> None:
    parser.add_argument("data", metavar="DATA",
                        help="image folder (one sub-folder per class), datasets folder/file, or hub dataset name")
    parser.add_argument("--split", default=split, help=f"split of a datasets source (default: {split})")
    parser.add_argument("--image-column", default="image")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--batch-size", type=int, default=32)


def _write_outputs(args: argparse.Namespace, result: Any, record: dict[str, Any]) -> None:
    from .evaluate import save_confusion_matrix_png, write_results_json

    if args.output:
        write_results_json(record, args.output)
    if args.confusion:
        save_confusion_matrix_png(result.confusion_matrix(), args.confusion, result.classnames)
    print(json.dumps(record["metrics"] | {"dataset": record["dataset"], "task": record["task"]}, indent=2))


def eval_main(argv: list[str]) -> int:
    """Evaluate zero-shot classification on a labelled dataset (`internvl-fm eval zeroshot DATA --model M`)."""
    return _run(_eval, argv, "internvl-fm eval")


def _eval(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="internvl-fm eval", description=eval_main.__doc__)
    parser.add_argument("task", choices=["zeroshot"], help="evaluation task")
    _add_data_args(parser, "test")
    _add_model_args(parser)
    parser.add_argument("--mode", default="InternVL-C", choices=["InternVL-C", "InternVL-G"])
    parser.add_argument("--lang", default="en", help="language of templates (and of --classnames imagenet)")
    parser.add_argument("--classnames", default=None,
                        help="JSON list file, 'a,b,c', or 'imagenet' for the bundled ImageNet-1K names in --lang "
                             "(default: the dataset's class names)")
    parser.add_argument("--templates", default=None, help="JSON list file or 'tpl1,tpl2' (default: --lang's)")
    parser.add_argument("--cache-dir", default=None, help="cache the text classifier here")
    parser.add_argument("--output", default=None, help="results JSON (CLIP_benchmark shape)")
    parser.add_argument("--confusion", default=None, help="confusion-matrix PNG")
    args = parser.parse_args(argv)

    from .errors import ClassificationError
    from .evaluate import results_record
    from .prompts import imagenet_classnames, normalize_language
    from .sources import load_dataset_source
    from .zeroshot import ZeroShotClassifier, evaluate_zeroshot

    language = normalize_language(args.lang)
    dataset = load_dataset_source(args.data, split=args.split, image_column=args.image_column,
                                  label_column=args.label_column)
    if args.classnames == "imagenet":
        classnames, allow_dups = imagenet_classnames(language), True
    else:
        classnames, allow_dups = _read_list(args.classnames) or list(dataset.classes), False
    if len(classnames) != len(dataset.classes):
        raise ClassificationError(f"{len(classnames)} classnames for a dataset with {len(dataset.classes)} classes")
    model = _load_model(args)
    clf = ZeroShotClassifier.from_classnames(model, classnames, _read_list(args.templates), language=language,
                                             mode=args.mode, cache_dir=args.cache_dir, allow_duplicates=allow_dups)
    result = evaluate_zeroshot(clf, dataset, batch_size=args.batch_size)
    record = results_record(str(args.data), args.mode, "zeroshot_classification", result.metrics, language,
                            pretrained=str(args.model))
    _write_outputs(args, result, record)
    return 0


# ------------------------------------------------------------------------------------------------------ probe


def probe_main(argv: list[str]) -> int:
    """Linear probe on frozen features: `probe train DATA --model M --head OUT`, `probe eval DATA --model M --head H`."""
    return _run(_probe, argv, "internvl-fm probe")


def _probe(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="internvl-fm probe", description=probe_main.__doc__)
    parser.add_argument("action", choices=["train", "eval"])
    _add_data_args(parser, "train")
    _add_model_args(parser)
    parser.add_argument("--head", required=True, help="head folder: written by train, read by eval")
    parser.add_argument("--feature", default="cls_patch_concat", choices=["cls_patch_concat", "clip_embedding"])
    parser.add_argument("--cache-dir", default=None, help="cache extracted features here (safetensors)")
    parser.add_argument("--val-data", default=None, help="held-out data for the sweep (default: split of DATA)")
    parser.add_argument("--val-split", default="validation", help="split of a datasets --val-data source")
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--logreg", action="store_true", help="scikit-learn logistic regression instead of SGD")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--min-steps", type=int, default=1000, help="at least this many SGD steps (small data)")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--train-batch-size", type=int, default=256)
    parser.add_argument("--weight-decays", default="0,1e-4,1e-3,1e-2",
                        help="regularisation sweep (weight decay; C values with --logreg)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="results JSON of `probe eval` (CLIP_benchmark shape)")
    parser.add_argument("--confusion", default=None, help="confusion-matrix PNG of `probe eval`")
    args = parser.parse_args(argv)

    from ._utils import hash_json
    from .errors import ClassificationError
    from .evaluate import results_record
    from .probe import (LinearProbeHead, ProbeTrainingConfig, evaluate_probe, extract_features,
                        fit_logistic_regression, train_linear_probe)
    from .sources import load_dataset_source

    model = _load_model(args, need_text=args.feature == "clip_embedding")

    def features(source: str, split: str):
        dataset = load_dataset_source(source, split=split, image_column=args.image_column,
                                      label_column=args.label_column)
        key = hash_json({"data": str(Path(source).resolve()) if Path(source).exists() else source, "split": split,
                         "model": str(args.model), "feature": args.feature})
        cache = Path(args.cache_dir) / f"features-{key}.safetensors" if args.cache_dir else None
        return dataset, extract_features(model, dataset, feature_type=args.feature, batch_size=args.batch_size,
                                         cache_path=cache, cache_key=key)

    dataset, feats = features(args.data, args.split)
    if args.action == "train":
        sweep = tuple(float(v) for v in args.weight_decays.split(","))
        if args.logreg:
            result = fit_logistic_regression(feats.features, feats.labels, Cs=sweep, val_fraction=args.val_fraction,
                                             seed=args.seed, feature_type=args.feature, classnames=dataset.classes)
        else:
            val = features(args.val_data, args.val_split)[1] if args.val_data else None
            config = ProbeTrainingConfig(epochs=args.epochs, min_steps=args.min_steps, lr=args.lr, batch_size=args.train_batch_size,
                                         weight_decays=sweep, val_fraction=args.val_fraction, seed=args.seed)
            result = train_linear_probe(feats.features, feats.labels, config=config, feature_type=args.feature,
                                        classnames=dataset.classes,
                                        val_features=val.features if val else None,
                                        val_labels=val.labels if val else None)
        result.head.save_pretrained(args.head)
        print(json.dumps({"head": str(args.head), "method": result.method,
                          "best_regularization": result.best_regularization,
                          "sweep": {str(k): v for k, v in result.sweep.items()}}, indent=2))
        return 0
    head = LinearProbeHead.from_pretrained(args.head, feature_type=args.feature)
    if head.config.feature_type != args.feature:
        raise ClassificationError(f"head {args.head} was trained on {head.config.feature_type!r} features, "
                                  f"not {args.feature!r} (pass --feature {head.config.feature_type})")
    result = evaluate_probe(head, feats)
    if not result.classnames:
        result.classnames = list(dataset.classes)
    record = results_record(str(args.data), str(args.model), "linear_probe", result.metrics, "en",
                            feature=args.feature)
    _write_outputs(args, result, record)
    return 0
