"""Labelled image datasets for evaluation and probes: an image folder (one sub-folder per class) or a
Hugging Face `datasets` table (saved to disk, a parquet / csv / json file, or a hub name)."""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from internvl_fm.processing import load_image

from .errors import ClassificationError

DATASET_FILE_SUFFIXES = (".parquet", ".csv", ".json", ".jsonl")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class ImageFolderDataset(Dataset):
    """`root/<class>/<image>`; classes are the sorted sub-folder names (torchvision ImageFolder order)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if not self.root.is_dir():
            raise ClassificationError(f"image folder {self.root} does not exist")
        self.classes = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not self.classes:
            raise ClassificationError(f"image folder {self.root} has no class sub-folders")
        self.samples: list[tuple[Path, int]] = []
        for label, name in enumerate(self.classes):
            files = sorted(p for p in (self.root / name).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
            self.samples += [(p, label) for p in files]
        if not self.samples:
            raise ClassificationError(f"image folder {self.root} holds no images ({', '.join(IMAGE_EXTENSIONS)})")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        path, label = self.samples[index]
        return load_image(path), label


class TableDataset(Dataset):
    """Rows of a `datasets.Dataset` with an image column (PIL images, paths or bytes) and an integer label column."""

    def __init__(self, table: Any, image_column: str = "image", label_column: str = "label",
                 classes: Sequence[str] | None = None):
        missing = [c for c in (image_column, label_column) if c not in table.column_names]
        if missing:
            raise ClassificationError(
                f"dataset table lacks column(s) {missing}; it has {table.column_names} "
                f"(pass --image-column / --label-column)"
            )
        self.table = table
        self.image_column = image_column
        self.label_column = label_column
        if classes is None:
            feature = table.features[label_column]
            names = getattr(feature, "names", None)
            if names is None:
                n = int(max(table[label_column])) + 1
                names = [str(i) for i in range(n)]
            classes = names
        self.classes = list(classes)

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        row = self.table[index]
        image = row[self.image_column]
        if isinstance(image, dict) and image.get("bytes") is not None:
            import io

            image = Image.open(io.BytesIO(image["bytes"]))
        elif isinstance(image, dict) and image.get("path"):
            image = image["path"]
        if isinstance(image, Image.Image):
            image = image.convert("RGB")
        else:
            image = load_image(image)
        return image, int(row[self.label_column])


def load_dataset_source(source: str | os.PathLike, *, split: str = "test", image_column: str = "image",
                        label_column: str = "label") -> ImageFolderDataset | TableDataset:
    """Open `source` as an image folder, a `save_to_disk` folder, a parquet/csv/json file, or a hub dataset name."""
    path = Path(source)
    if path.is_dir() and not (path / "dataset_info.json").exists() and not (path / "dataset_dict.json").exists():
        return ImageFolderDataset(path)
    text = str(source)
    if not path.exists() and (text.startswith((".", "/", "~")) or path.suffix.lower() in DATASET_FILE_SUFFIXES):
        raise ClassificationError(f"dataset not found: {text}")
    try:
        import datasets
    except ImportError:
        from .errors import MissingDependencyError

        raise MissingDependencyError(f"reading {text} needs the datasets package: pip install 'internvl-fm[data]' "
                                     "(an image folder with one sub-folder per class needs nothing)") from None
    if path.is_dir():
        table = datasets.load_from_disk(str(path))
        if isinstance(table, datasets.DatasetDict):
            if split not in table:
                raise ClassificationError(f"{path} has splits {list(table)}, not {split!r} (pass --split)")
            table = table[split]
    elif path.is_file():
        kind = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json"}.get(path.suffix.lower())
        if kind is None:
            raise ClassificationError(f"cannot read dataset file {path}: use .parquet, .csv, .json or .jsonl")
        table = datasets.load_dataset(kind, data_files=str(path), split="train")
    else:
        try:
            table = datasets.load_dataset(text, split=split)
        except Exception as exc:  # offline, unknown name, gated, missing split...
            reason = (str(exc).strip().splitlines() or [""])[0][:200]
            raise ClassificationError(f"{text!r} is not a local folder or file and could not be loaded as a hub "
                                      f"dataset ({type(exc).__name__}: {reason})") from None
    return TableDataset(table, image_column=image_column, label_column=label_column)


def image_loader(dataset: Dataset, transform: Callable[[list[Image.Image]], torch.Tensor], *, batch_size: int = 32,
                 num_workers: int = 0) -> DataLoader:
    """Batches of `(pixel_values [B,3,S,S], labels [B])` from a dataset of `(PIL image | tensor, label)` items."""

    def collate(batch: list[tuple[Any, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        images = [item[0] for item in batch]
        if all(isinstance(im, torch.Tensor) for im in images):
            pixels = torch.stack(images)
        else:
            pixels = transform(images)
        return pixels, torch.as_tensor([int(item[1]) for item in batch], dtype=torch.long)

    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate)
