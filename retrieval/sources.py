"""Data sources for the embedding job: a stream of records (image file or bytes, optional caption, key).

Supported sources (`open_source` picks one from what it is given):

* a folder of images (recursive; a caption is read from a `.txt` file with the same stem, clip-retrieval style),
* a list file: `.txt` (one `path[<TAB>caption]` per line) or `.csv` / `.tsv` with a header naming the image column
  (`image_path`, `filepath`, `path`, `image`) and optionally the caption column (`caption`, `text`, `title`),
* parquet files (one file, a folder or a glob) with image bytes (`image`/`jpg`/`png` column, raw bytes or a
  `{bytes, path}` struct) or image paths, and captions,
* webdataset tar shards (one file, a folder or a glob; image `jpg/png/webp/...` + `txt`/`json` caption per key),
* a Hugging Face `datasets.Dataset` (object, a folder written by `save_to_disk`, or `hf://name[:split]`).

Records come in a fixed order, so a position in the stream identifies a record; the job resumes by position.
"""
from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from .errors import SourceError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CAPTION_COLUMNS = ("caption", "text", "TEXT", "title", "txt")
IMAGE_PATH_COLUMNS = ("image_path", "filepath", "file_path", "path", "image")
IMAGE_BYTES_COLUMNS = ("image", "jpg", "jpeg", "png", "webp", "image_bytes", "img")


@dataclass
class Record:
    """One item of a source: an image (file path or encoded bytes), an optional caption and a key."""

    key: str
    path: str | None = None
    data: bytes | None = None
    caption: str | None = None
    caption_path: str | None = None  # read lazily (in the loader worker)

    @property
    def name(self) -> str:
        """What to call the record in reports: its file path, else its key."""
        return self.path or self.key

    def image_source(self) -> Any:
        """What `internvl_fm.processing.load_image` gets: the path, or the bytes wrapped in a file object."""
        if self.data is not None:
            return io.BytesIO(self.data)
        return self.path

    def read_caption(self) -> str | None:
        if self.caption is None and self.caption_path is not None:
            self.caption = Path(self.caption_path).read_text(encoding="utf-8", errors="replace").strip()
        return self.caption


class Source:
    """An ordered, restartable stream of records."""

    #: identifies the source across runs (resume bookkeeping)
    source_id: str
    #: folders whose files may be served back (the web service only serves files under these)
    roots: list[str]

    def __iter__(self) -> Iterator[Record]:
        return self.iter_from(0)

    def iter_from(self, start: int) -> Iterator[Record]:
        """Records from position `start` on."""
        return islice(self._iter(), start, None)

    def _iter(self) -> Iterator[Record]:
        """All records; sources with random access override `iter_from` instead."""
        raise NotImplementedError

    def __len__(self) -> int:
        return sum(1 for _ in self.iter_from(0))

    def length_hint(self) -> int | None:
        """The number of records when it is cheap to know (for progress bars), else None."""
        return None

    def has_captions(self) -> bool | None:
        """Whether records carry captions (None: unknown until read)."""
        return None


def _digest(*parts: str) -> str:
    return hashlib.sha1("\0".join(parts).encode()).hexdigest()[:16]


class FolderSource(Source):
    """Image files under a folder (sorted by relative path); `x.txt` beside `x.jpg` is its caption."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise SourceError(f"image folder {self.root} does not exist")
        self.files = sorted(str(p) for p in self.root.rglob("*")
                            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        self.source_id = f"folder:{self.root}"
        self.roots = [str(self.root)]

    def length_hint(self) -> int:
        return len(self)

    def __len__(self) -> int:
        return len(self.files)

    def iter_from(self, start: int) -> Iterator[Record]:
        for path in self.files[start:]:
            caption = os.path.splitext(path)[0] + ".txt"
            yield Record(key=os.path.relpath(path, self.root), path=path,
                         caption_path=caption if os.path.isfile(caption) else None)

    def has_captions(self) -> bool:
        return any(os.path.isfile(os.path.splitext(p)[0] + ".txt") for p in self.files)


class ListSource(Source):
    """A list file: `.txt` (`path[<TAB>caption]` per line, `#` comments) or `.csv`/`.tsv` with a header."""

    def __init__(self, file: str | os.PathLike, image_column: str | None = None, caption_column: str | None = None):
        self.file = Path(file).resolve()
        if not self.file.is_file():
            raise SourceError(f"list file {self.file} does not exist")
        self.entries = self._read(image_column, caption_column)
        self.source_id = f"list:{self.file}:{_digest(*(p for p, _ in self.entries))}"
        self.roots = sorted({os.path.dirname(p) for p, _ in self.entries})

    def _resolve(self, path: str) -> str:
        return str((self.file.parent / os.path.expanduser(path.strip())).resolve())

    def _read(self, image_column: str | None, caption_column: str | None) -> list[tuple[str, str | None]]:
        text = self.file.read_text(encoding="utf-8")
        if self.file.suffix.lower() == ".txt":
            entries = []
            for line in text.splitlines():
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                path, _, caption = line.partition("\t")
                entries.append((self._resolve(path), caption.strip() or None))
            return entries
        delimiter = "\t" if self.file.suffix.lower() == ".tsv" else ","
        rows = list(csv.DictReader(io.StringIO(text), delimiter=delimiter))
        header = list(rows[0]) if rows else []
        image_col = image_column or next((c for c in IMAGE_PATH_COLUMNS if c in header), None)
        caption_col = caption_column or next((c for c in CAPTION_COLUMNS if c in header), None)
        if image_col is None or image_col not in header:
            raise SourceError(f"{self.file}: no image path column (looked for {image_column or IMAGE_PATH_COLUMNS}; "
                              f"header is {header})")
        return [(self._resolve(r[image_col]), (r.get(caption_col) or None) if caption_col else None) for r in rows]

    def length_hint(self) -> int:
        return len(self)

    def __len__(self) -> int:
        return len(self.entries)

    def iter_from(self, start: int) -> Iterator[Record]:
        for position, (path, caption) in enumerate(self.entries[start:], start):
            yield Record(key=f"{position:09d}", path=path, caption=caption)

    def has_captions(self) -> bool:
        return any(c is not None for _, c in self.entries)


def _expand(path: str | os.PathLike, suffix: str) -> list[str]:
    """A file, a folder (its `*suffix` files) or a glob -> sorted file list."""
    text = str(path)
    if any(ch in text for ch in "*?["):
        files = glob.glob(text)
    elif os.path.isdir(text):
        files = [str(p) for p in Path(text).rglob(f"*{suffix}")]
    else:
        files = [text]
    files = sorted(os.path.abspath(f) for f in files)
    missing = [f for f in files if not os.path.isfile(f)]
    if not files or missing:
        raise SourceError(f"no {suffix} files found at {text}" + (f" (missing: {missing[:3]})" if missing else ""))
    return files


def _image_bytes(value: Any) -> tuple[bytes | None, str | None]:
    """Image column value (raw bytes, `{bytes, path}` struct or a path string) -> (bytes, path)."""
    if value is None:
        return None, None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value), None
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        return (bytes(data) if data is not None else None), path
    if isinstance(value, str):
        return None, value
    raise SourceError(f"cannot read an image from a {type(value).__name__} column value")


class ParquetSource(Source):
    """Parquet files with image bytes (or image paths) and optional captions."""

    def __init__(self, path: str | os.PathLike, image_column: str | None = None, caption_column: str | None = None,
                 key_column: str = "key"):
        import pyarrow.parquet as pq

        self.files = _expand(path, ".parquet")
        schema = pq.read_schema(self.files[0])
        names = schema.names
        self.image_column = image_column or next((c for c in (*IMAGE_BYTES_COLUMNS, *IMAGE_PATH_COLUMNS)
                                                  if c in names), None)
        if self.image_column is None or self.image_column not in names:
            raise SourceError(f"{self.files[0]}: no image column (columns are {names})")
        self.caption_column = caption_column or next((c for c in CAPTION_COLUMNS if c in names), None)
        self.key_column = key_column if key_column in names else None
        self.source_id = f"parquet:{_digest(*self.files)}"
        self.roots = sorted({os.path.dirname(f) for f in self.files})

    def length_hint(self) -> int:
        return len(self)

    def __len__(self) -> int:
        import pyarrow.parquet as pq

        return sum(pq.ParquetFile(f).metadata.num_rows for f in self.files)

    def _iter(self) -> Iterator[Record]:
        import pyarrow.parquet as pq

        columns = [c for c in (self.image_column, self.caption_column, self.key_column) if c]
        for file in self.files:
            row = 0
            for batch in pq.ParquetFile(file).iter_batches(columns=columns, batch_size=1024):
                data = batch.to_pydict()
                for i in range(batch.num_rows):
                    image, path = _image_bytes(data[self.image_column][i])
                    if path is not None and image is None and not os.path.isabs(path):
                        path = os.path.join(os.path.dirname(file), path)
                    key = data[self.key_column][i] if self.key_column else f"{Path(file).stem}/{row:09d}"
                    caption = data[self.caption_column][i] if self.caption_column else None
                    yield Record(key=str(key), path=path if image is None else None, data=image, caption=caption)
                    row += 1

    def has_captions(self) -> bool:
        return self.caption_column is not None


class WebDatasetSource(Source):
    """webdataset tar shards: members grouped by key (`dir/key.ext`), one image + optional `txt`/`json` caption."""

    def __init__(self, path: str | os.PathLike):
        self.files = _expand(path, ".tar")
        self.source_id = f"webdataset:{_digest(*self.files)}"
        self.roots = sorted({os.path.dirname(f) for f in self.files})

    def _iter(self) -> Iterator[Record]:
        for file in self.files:
            yield from self._iter_tar(file)

    @staticmethod
    def _iter_tar(file: str) -> Iterator[Record]:
        current: str | None = None
        sample: dict[str, bytes] = {}

        def flush() -> Iterator[Record]:
            image_ext = next((e for e in IMAGE_EXTENSIONS if e[1:] in sample), None)
            if current is None or image_ext is None:
                return
            caption = None
            if "txt" in sample:
                caption = sample["txt"].decode("utf-8", errors="replace").strip()
            elif "json" in sample:
                meta = json.loads(sample["json"] or b"{}")
                if isinstance(meta, dict):
                    caption = meta.get("caption") or meta.get("text")
            yield Record(key=f"{Path(file).stem}/{current}", data=sample[image_ext[1:]], caption=caption)

        try:
            with tarfile.open(file, mode="r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    folder, base = os.path.split(member.name)
                    stem, _, ext = base.partition(".")
                    key = f"{folder}/{stem}" if folder else stem
                    if key != current:
                        yield from flush()
                        current, sample = key, {}
                    fh = tar.extractfile(member)
                    sample[ext.lower()] = fh.read() if fh else b""
                yield from flush()
        except tarfile.TarError as exc:
            raise SourceError(f"cannot read webdataset shard {file}: {exc}") from exc


class DatasetSource(Source):
    """A Hugging Face `datasets.Dataset` with an image column (Image feature, bytes or paths) and captions."""

    def __init__(self, dataset: Any, image_column: str | None = None, caption_column: str | None = None,
                 name: str | None = None):
        names = list(dataset.column_names)
        self.image_column = image_column or next((c for c in (*IMAGE_BYTES_COLUMNS, *IMAGE_PATH_COLUMNS)
                                                  if c in names), None)
        if self.image_column is None or self.image_column not in names:
            raise SourceError(f"dataset has no image column (columns are {names})")
        self.caption_column = caption_column or next((c for c in CAPTION_COLUMNS if c in names), None)
        self.dataset = self._undecoded(dataset, self.image_column)
        fingerprint = getattr(dataset, "_fingerprint", None) or name or str(len(dataset))
        self.source_id = f"datasets:{name or ''}:{fingerprint}"
        self.roots: list[str] = []

    @staticmethod
    def _undecoded(dataset: Any, column: str) -> Any:
        """Keep images encoded (bytes / path) so that decoding happens in the loader workers."""
        import datasets

        feature = dataset.features[column]
        if isinstance(feature, datasets.Image) and feature.decode:
            return dataset.cast_column(column, datasets.Image(decode=False))
        return dataset

    def length_hint(self) -> int:
        return len(self)

    def __len__(self) -> int:
        return len(self.dataset)

    def iter_from(self, start: int) -> Iterator[Record]:
        for position in range(start, len(self.dataset), 256):
            rows = self.dataset[position:position + 256]
            for offset, value in enumerate(rows[self.image_column]):
                image, path = _image_bytes(value)
                caption = rows[self.caption_column][offset] if self.caption_column else None
                yield Record(key=f"{position + offset:09d}", path=path if image is None else None, data=image,
                             caption=caption)

    def has_captions(self) -> bool:
        return self.caption_column is not None


def open_source(source: Any, image_column: str | None = None, caption_column: str | None = None) -> Source:
    """Turn a folder, list file, parquet / tar path or glob, `datasets` table or `hf://name[:split]` into a Source."""
    if isinstance(source, Source):
        return source
    if hasattr(source, "column_names") and hasattr(source, "features"):
        return DatasetSource(source, image_column, caption_column)
    text = os.fspath(source)
    if text.startswith("hf://"):
        import datasets

        name, _, split = text[5:].partition(":")
        return DatasetSource(datasets.load_dataset(name, split=split or "train"), image_column, caption_column,
                             name=text)
    path = Path(text)
    if path.is_dir():
        if (path / "dataset_info.json").is_file() and (path / "state.json").is_file():
            import datasets

            return DatasetSource(datasets.load_from_disk(text), image_column, caption_column, name=str(path.resolve()))
        if any(path.glob("*.parquet")):
            return ParquetSource(path, image_column, caption_column)
        if any(path.glob("*.tar")):
            return WebDatasetSource(path)
        return FolderSource(path)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return ParquetSource(text, image_column, caption_column)
    if suffix == ".tar":
        return WebDatasetSource(text)
    if suffix in (".txt", ".csv", ".tsv"):
        return ListSource(path, image_column, caption_column)
    raise SourceError(f"cannot tell what kind of source {text!r} is: expected an image folder, a .txt/.csv/.tsv "
                      "list, .parquet or .tar shards (file, folder or glob), a datasets folder or hf://name")
