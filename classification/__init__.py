"""Image classification with InternVL: multilingual zero-shot (images and video), linear probes, evaluation
the CLIP_benchmark way, and a loader that lets upstream CLIP_benchmark evaluate internvl-fm models."""
from .errors import ClassificationError, FeatureDimError, LabelError, TemplateError, UnknownLanguageError
from .evaluate import (EvaluationResult, classification_metrics, confusion_matrix, results_record,
                       save_confusion_matrix_png, write_results_json)
from .probe import (FeatureSet, LinearProbeConfig, LinearProbeHead, ProbeResult, ProbeTrainingConfig,
                    evaluate_probe, extract_features, fit_logistic_regression, train_linear_probe)
from .prompts import LANGUAGES, imagenet_classnames, zeroshot_templates
from .sources import ImageFolderDataset, TableDataset, load_dataset_source
from .zeroshot import ZeroShotClassifier, ZeroShotPrediction, build_zeroshot_weights, evaluate_zeroshot

__all__ = [
    "ClassificationError", "FeatureDimError", "LabelError", "TemplateError", "UnknownLanguageError",
    "EvaluationResult", "classification_metrics", "confusion_matrix", "results_record", "save_confusion_matrix_png",
    "write_results_json", "FeatureSet", "LinearProbeConfig", "LinearProbeHead", "ProbeResult", "ProbeTrainingConfig",
    "evaluate_probe", "extract_features", "fit_logistic_regression", "train_linear_probe", "LANGUAGES",
    "imagenet_classnames", "zeroshot_templates", "ImageFolderDataset", "TableDataset", "load_dataset_source",
    "ZeroShotClassifier", "ZeroShotPrediction", "build_zeroshot_weights", "evaluate_zeroshot",
]
