"""`internvl-fm classify`, `internvl-fm eval zeroshot` and `internvl-fm probe train|eval`.

Errors the user can fix are `InternVLError`s: `internvl-fm` prints them as one line and exits 2.
"""
from __future__ import annotations

import argparse
import inspect
import json
import warnings
from pathlib import Path
from typing import Any

from internvl_fm.cli_utils import CLIError, HelpFormatter, add_model_options, dtype_or_none, new_parser, resolve_device
from internvl_fm.quantization import add_quantization_option

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")
CLIP_MODEL_HELP = "InternVL-C/G checkpoint folder or hub id (InternVL-14B-224px layout)"
VIT_MODEL_HELP = ("InternViT checkpoint folder or hub id, or any InternVL checkpoint (its vision tower is used); "
                  "--feature clip_embedding needs an InternVL-C/G checkpoint")
MODE_HELP = "image embedding: InternVL-C (contrastive projector) or InternVL-G (C + QLLaMA query ensemble)"
DATA_HELP = "image folder (one sub-folder per class), datasets folder / parquet / csv / json file, or hub dataset name"


def _load_model(args: argparse.Namespace, *, need_text: bool = True):
    """InternVLModel when text embeddings are needed, else only the InternViT (of any InternVL checkpoint). A folder
    of another kind is refused by `from_pretrained` before any weight is read."""
    from internvl_fm import InternVisionModel, InternVLModel

    cls = InternVLModel if need_text else InternVisionModel
    return cls.from_pretrained(args.model, dtype=dtype_or_none(args.dtype), device=resolve_device(args.device),
                               quantization=args.quantization)


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


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    return values


def _sub_parser(subparsers, name: str, description: str) -> argparse.ArgumentParser:
    return subparsers.add_parser(name, help=description.splitlines()[0], description=description,
                                 formatter_class=HelpFormatter)


# ------------------------------------------------------------------------------------------------------ classify


def classify_main(argv: list[str]) -> int:
    """Zero-shot classify images (or video clips) against comma-separated labels, or ImageNet-1K by default."""
    parser = new_parser("internvl-fm classify", classify_main.__doc__)
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (or video files: frames averaged)")
    parser.add_argument("--labels", default=None,
                        help='"cat,dog,..." or a JSON list file; if not given: ImageNet-1K classnames in --lang')
    parser.add_argument("--lang", default="en", help="language of labels/templates: en, zh, ja, ar, it")
    parser.add_argument("--templates", default=None,
                        help="a JSON list file or 'tpl1,tpl2' with {c}; if not given: the bundled ones of --lang")
    parser.add_argument("--mode", default="InternVL-C", choices=["InternVL-C", "InternVL-G"], help=MODE_HELP)
    parser.add_argument("--top-k", type=_positive_int, default=None,
                        help="labels shown per image; if not given: all given labels, or 5 for ImageNet")
    parser.add_argument("--num-frames", type=_positive_int, default=8, help="frames sampled per video (paper: 1 or 8)")
    parser.add_argument("--cache-dir", default=None, help="cache the text classifier here (safetensors)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per input instead of text")
    add_model_options(parser, model=CLIP_MODEL_HELP)
    add_quantization_option(parser)
    args = parser.parse_args(argv)

    from .prompts import normalize_language, validate_labels, validate_templates
    from .zeroshot import ZeroShotClassifier

    missing = [source for source in args.images if not Path(source).is_file()]
    if missing:
        raise CLIError(f"input file(s) not found: {', '.join(missing)}")
    language = normalize_language(args.lang)
    labels = _read_list(args.labels)
    templates = _read_list(args.templates)
    if labels is not None:  # bad labels / templates fail before the model loads
        validate_labels(labels)
    if templates is not None:
        validate_templates(templates)
    single = labels is not None and len(labels) == 1
    if single:
        warnings.warn(f"one label ({labels[0]!r}): a softmax over a single label is always 1.0, so the cosine "
                      "similarity is shown beside it; add labels to compare against (e.g. --labels "
                      f"\"{labels[0]},something else\")", stacklevel=1)
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
            print(json.dumps({"input": source, "labels": pred.labels, "probs": pred.probs, "cosines": pred.cosines},
                             ensure_ascii=False))
        else:
            print(source)
            for label, prob, cosine in zip(pred.labels, pred.probs, pred.cosines):
                print(f"  {prob:8.4f}  {label}" + (f"  (cosine {cosine:.4f})" if single else ""))
    return 0


# ------------------------------------------------------------------------------------------------------ eval


def _add_data_args(parser: argparse.ArgumentParser, split: str) -> None:
    parser.add_argument("data", metavar="DATA", help=DATA_HELP)
    parser.add_argument("--split", default=split, help="split of a datasets source")
    parser.add_argument("--image-column", default="image", help="image column of a datasets source")
    parser.add_argument("--label-column", default="label", help="label column of a datasets source")
    parser.add_argument("--batch-size", type=_positive_int, default=32, help="images per forward pass")


def _add_report_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default=None, help="results JSON (CLIP_benchmark shape)")
    parser.add_argument("--confusion", default=None, help="confusion-matrix PNG (needs matplotlib)")


def _check_report_args(args: argparse.Namespace) -> None:
    """Fail before any work when an output cannot be produced."""
    if args.confusion:
        from .evaluate import require_matplotlib

        require_matplotlib()


def _check_logreg_args(args: argparse.Namespace) -> None:
    """`probe train --logreg`: scikit-learn installed and C values > 0, checked before any work."""
    try:
        import sklearn  # noqa: F401
    except ImportError:
        from .errors import MissingDependencyError

        raise MissingDependencyError("--logreg needs scikit-learn: pip install scikit-learn") from None
    if args.weight_decays is not None and min(args.weight_decays) <= 0:
        raise CLIError(f"--weight-decays with --logreg are C values and must be > 0, got {list(args.weight_decays)}")


def _write_outputs(args: argparse.Namespace, result: Any, record: dict[str, Any]) -> None:
    from .evaluate import _json_safe, save_confusion_matrix_png, write_results_json

    if args.output:
        write_results_json(record, args.output)
    if args.confusion:
        save_confusion_matrix_png(result.confusion_matrix(), args.confusion, result.classnames)
    summary = record["metrics"] | {"dataset": record["dataset"], "task": record["task"]}
    print(json.dumps(_json_safe(summary), ensure_ascii=False, indent=2))  # strict JSON: NaN (acc5 < 5 classes) -> null


def _eval_clip_benchmark(argv: list[str]) -> int:
    """`internvl-fm eval clip-benchmark [CLIP_benchmark eval options]`: upstream CLIP_benchmark's own CLI."""
    from .clip_benchmark import clip_benchmark_parser, run_clip_benchmark

    run_clip_benchmark(clip_benchmark_parser("internvl-fm eval clip-benchmark").parse_args(argv))
    return 0


def eval_main(argv: list[str]) -> int:
    """Evaluate: `eval zeroshot DATA --model M`, or `eval clip-benchmark ...` (upstream CLIP_benchmark's own CLI)."""
    if argv[:1] == ["clip-benchmark"]:  # its options are CLIP_benchmark's own parser's, not ours
        return _eval_clip_benchmark(argv[1:])
    parser = new_parser("internvl-fm eval", eval_main.__doc__)
    tasks = parser.add_subparsers(dest="task", required=True, metavar="TASK")
    tasks.add_parser("clip-benchmark", add_help=False,
                     help="upstream CLIP_benchmark's `eval` (its datasets, tasks and result JSON) with an internvl-fm "
                          "model; `internvl-fm eval clip-benchmark --help` lists its options")
    zeroshot = _sub_parser(tasks, "zeroshot", "Zero-shot classification with InternVL-C/G: acc1, acc5, mean "
                                              "per-class recall.")
    _add_data_args(zeroshot, "test")
    add_model_options(zeroshot, model=CLIP_MODEL_HELP)
    add_quantization_option(zeroshot)
    zeroshot.add_argument("--mode", default="InternVL-C", choices=["InternVL-C", "InternVL-G"], help=MODE_HELP)
    zeroshot.add_argument("--lang", default="en", help="language of templates (and of --classnames imagenet)")
    zeroshot.add_argument("--classnames", default=None,
                          help="JSON list file, 'a,b,c', or 'imagenet' for the bundled ImageNet-1K names in --lang "
                               "(if not given: the dataset's class names)")
    zeroshot.add_argument("--templates", default=None, help="JSON list file or 'tpl1,tpl2'; if not given: --lang's")
    zeroshot.add_argument("--cache-dir", default=None, help="cache the text classifier here")
    _add_report_args(zeroshot)
    args = parser.parse_args(argv)
    _check_report_args(args)

    from .errors import ClassificationError
    from .evaluate import results_record
    from .prompts import imagenet_classnames, normalize_language, validate_labels, validate_templates
    from .sources import load_dataset_source
    from .zeroshot import ZeroShotClassifier, evaluate_zeroshot

    language = normalize_language(args.lang)
    templates = _read_list(args.templates)
    if templates is not None:
        validate_templates(templates)
    dataset = load_dataset_source(args.data, split=args.split, image_column=args.image_column,
                                  label_column=args.label_column)
    if args.classnames == "imagenet":
        classnames, allow_dups = imagenet_classnames(language), True
    else:
        classnames, allow_dups = _read_list(args.classnames) or list(dataset.classes), False
    validate_labels(classnames, allow_duplicates=allow_dups)
    if len(classnames) != len(dataset.classes):
        raise ClassificationError(f"{len(classnames)} classnames for a dataset with {len(dataset.classes)} classes")
    model = _load_model(args)
    clf = ZeroShotClassifier.from_classnames(model, classnames, templates, language=language,
                                             mode=args.mode, cache_dir=args.cache_dir, allow_duplicates=allow_dups)
    result = evaluate_zeroshot(clf, dataset, batch_size=args.batch_size)
    record = results_record(str(args.data), args.mode, "zeroshot_classification", result.metrics, language,
                            pretrained=str(args.model))
    _write_outputs(args, result, record)
    return 0


# ------------------------------------------------------------------------------------------------------ probe


def _add_probe_args(parser: argparse.ArgumentParser, split: str, head_help: str) -> None:
    _add_data_args(parser, split)
    add_model_options(parser, model=VIT_MODEL_HELP)
    add_quantization_option(parser)
    parser.add_argument("--head", required=True, help=head_help)
    parser.add_argument("--feature", default="cls_patch_concat", choices=["cls_patch_concat", "clip_embedding"],
                        help="cls_patch_concat: CLS + mean patch token of the last block (official probe); "
                             "clip_embedding: the InternVL-C image embedding")
    parser.add_argument("--cache-dir", default=None, help="cache extracted features here (safetensors)")


def probe_main(argv: list[str]) -> int:
    """Linear probe on frozen InternViT features: `probe train` writes a head, `probe eval` scores it.

    `internvl-fm probe train DATA --model M --head OUT`, then `internvl-fm probe eval DATA --model M --head OUT`."""
    parser = new_parser("internvl-fm probe", inspect.cleandoc(probe_main.__doc__))
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    train = _sub_parser(actions, "train", "Train a linear probe (BatchNorm + Linear) on frozen features; the "
                                          "regularisation is picked on a held-out split.")
    _add_probe_args(train, "train", "head folder to write")
    train.add_argument("--val-data", default=None,
                       help="held-out data for the sweep; if not given: a --val-fraction split of DATA")
    train.add_argument("--val-split", default="validation", help="split of a datasets --val-data source")
    train.add_argument("--val-fraction", type=float, default=0.2, help="held-out fraction of DATA without --val-data")
    train.add_argument("--logreg", action="store_true", help="scikit-learn logistic regression instead of SGD")
    train.add_argument("--epochs", type=_positive_int, default=10, help="SGD epochs")
    train.add_argument("--min-steps", type=int, default=1000, help="at least this many SGD steps (small data)")
    train.add_argument("--lr", type=float, default=0.1, help="SGD learning rate")
    train.add_argument("--train-batch-size", type=_positive_int, default=256, help="SGD batch size of the head")
    train.add_argument("--weight-decays", type=_floats, default=None,
                       help="regularisation sweep, comma-separated: SGD weight decays, or C values (> 0) with "
                            "--logreg; if not given: 0,1e-4,1e-3,1e-2 (SGD) or 0.01,0.1,1,10 (--logreg)")
    train.add_argument("--seed", type=int, default=0, help="seed of the held-out split, head init and SGD order")
    evaluate = _sub_parser(actions, "eval", "Evaluate a trained linear probe: acc1, acc5, mean per-class recall.")
    _add_probe_args(evaluate, "test", "head folder written by `probe train`")
    _add_report_args(evaluate)
    args = parser.parse_args(argv)
    if args.action == "eval":
        _check_report_args(args)
    elif args.logreg:
        _check_logreg_args(args)

    from ._utils import hash_json
    from .errors import ClassificationError
    from .evaluate import results_record
    from .probe import (LinearProbeHead, ProbeTrainingConfig, evaluate_probe, extract_features,
                        fit_logistic_regression, train_linear_probe)
    from .sources import load_dataset_source

    head = None
    if args.action == "eval":  # a missing or mismatched head fails before any feature is extracted
        head = LinearProbeHead.from_pretrained(args.head, feature_type=args.feature)
        if head.config.feature_type != args.feature:
            raise ClassificationError(f"head {args.head} was trained on {head.config.feature_type!r} features, "
                                      f"not {args.feature!r} (pass --feature {head.config.feature_type})")
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
        sweep = {} if args.weight_decays is None else {"Cs" if args.logreg else "weight_decays": args.weight_decays}
        if args.logreg:
            result = fit_logistic_regression(feats.features, feats.labels, val_fraction=args.val_fraction,
                                             seed=args.seed, feature_type=args.feature, classnames=dataset.classes,
                                             **sweep)
        else:
            val = features(args.val_data, args.val_split)[1] if args.val_data else None
            config = ProbeTrainingConfig(epochs=args.epochs, min_steps=args.min_steps, lr=args.lr,
                                         batch_size=args.train_batch_size, val_fraction=args.val_fraction,
                                         seed=args.seed, **sweep)
            result = train_linear_probe(feats.features, feats.labels, config=config, feature_type=args.feature,
                                        classnames=dataset.classes,
                                        val_features=val.features if val else None,
                                        val_labels=val.labels if val else None)
        result.head.save_pretrained(args.head)
        print(json.dumps({"head": str(args.head), "method": result.method,
                          "best_regularization": result.best_regularization,
                          "sweep": {str(k): v for k, v in result.sweep.items()}}, indent=2))
        return 0
    result = evaluate_probe(head, feats)
    if not result.classnames:
        result.classnames = list(dataset.classes)
    record = results_record(str(args.data), str(args.model), "linear_probe", result.metrics, "en",
                            feature=args.feature)
    _write_outputs(args, result, record)
    return 0
