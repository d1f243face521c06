"""Reading and writing checkpoints in the official on-disk layout.

config.json + model.safetensors (or sharded `model-0000k-of-0000n.safetensors` + `model.safetensors.index.json`, or
`pytorch_model*.bin` read with `torch.load(weights_only=True)`). Models are built on the meta device; keys and shapes
are checked from the safetensors headers before any tensor is read; then tensors stream in one at a time, shard by
shard, cast to the asked dtype as they are read (through a 1 MiB buffer) and assigned, so loading peaks near the size
of the final weights (an fp32 checkpoint loaded as bf16: ~1.01x the bf16 weights). `quantization="int8"` quantises
each block linear as soon as its weights are in. Partial loads (the vision tower of a full checkpoint, the text side
only) read only the tensors they need.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from internvl_fm.errors import CheckpointNotFoundError, InternVLError, ModelKindError, WeightLoadingError

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3

# architectures[0] in config.json -> "module:Class" (resolved lazily: `internvl-fm info` imports no model code).
ARCHITECTURES: dict[str, str] = {
    "InternVisionModel": "internvl_fm.models.modeling_intern_vit:InternVisionModel",
    "InternVLModel": "internvl_fm.models.modeling_internvl:InternVLModel",
    "InternVLChatModel": "internvl_fm.models.modeling_internvl_chat:InternVLChatModel",
}

# What each architecture is, and the commands / classes that take it (for errors that name the right tool).
MODEL_KINDS: dict[str, tuple[str, str]] = {
    "InternVisionModel": ("an InternViT vision encoder",
                          "InternVisionModel, `internvl-fm seg-train` or `internvl-fm probe`"),
    "InternVLModel": ("an InternVL-C/G model (InternVL-14B-224px layout)",
                      "InternVLModel, `internvl-fm classify`, `index build`, `search` or `eval`"),
    "InternVLChatModel": ("an InternVL-Chat MLLM", "InternVLChatModel, `internvl-fm chat` or `serve-chat`"),
    "InternViTSegmentationModel": ("an InternViT segmentation model",
                                   "SegmentationModel, `internvl-fm segment` or `seg-eval`"),
    "transformers.InternVLModel": ("a transformers InternVLModel (-hf layout, no language-model head)",
                                   "InternVisionModel (its vision tower)"),
}

# Checkpoint layouts `save_pretrained(layout=...)` writes and `from_pretrained` reads (told apart by config.json):
# "original" is the OpenGVLab layout, "hf" transformers' native one (InternVLForConditionalGeneration,
# InternVLVisionModel: the `-hf` repos; see `internvl_fm.convert`).
LAYOUTS = ("original", "hf")


class LayoutError(InternVLError, ValueError):
    """A checkpoint layout name a model cannot write or read (the message names the ones it can)."""


def checkpoint_layout(config: dict[str, Any]) -> str:
    """The layout of a checkpoint, from its config.json: "hf" for a transformers-native `-hf` folder."""
    from internvl_fm.configuration_utils import is_transformers_hf_layout

    return "hf" if is_transformers_hf_layout(config) else "original"


def _architectures(config: dict[str, Any]) -> list[str]:
    """config.json `architectures`, transformers' -hf names translated to ours."""
    from internvl_fm.convert import HF_ARCHITECTURES

    archs = list(config.get("architectures") or [])
    return [HF_ARCHITECTURES.get(a, a) for a in archs] if checkpoint_layout(config) == "hf" else archs

_UMASK = os.umask(0)
os.umask(_UMASK)

_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]


def resolve_checkpoint(path_or_hub_id: str | os.PathLike, revision: str | None = None) -> Path:
    """A local checkpoint folder for a folder path, a path to its config.json, or a Hugging Face hub id."""
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path
    if path.is_file() and path.name == "config.json":
        return path.parent
    text = str(path_or_hub_id)
    if path.exists():
        raise CheckpointNotFoundError(f"{text} is a file, not a checkpoint folder")
    if not _looks_like_hub_id(text):
        raise CheckpointNotFoundError(f"checkpoint folder not found: {text}")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(text, revision=revision, allow_patterns=_HUB_PATTERNS)
    except Exception as exc:  # offline, unknown repo, gated...
        reason = (str(exc).strip().splitlines() or [""])[0][:200]
        raise CheckpointNotFoundError(f"{text!r} is not a local folder and could not be fetched from the Hugging "
                                      f"Face hub ({type(exc).__name__}: {reason})") from None
    return Path(local)


def _looks_like_hub_id(text: str) -> bool:
    """`owner/name` with hub-legal characters (a relative path such as `models/x` that does not exist locally is
    still tried on the hub, as transformers does)."""
    return re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*", text) is not None


def read_config(path_or_hub_id: str | os.PathLike) -> dict[str, Any]:
    """The parsed config.json of a checkpoint."""
    path = Path(path_or_hub_id)
    file = path if path.is_file() else resolve_checkpoint(path_or_hub_id) / "config.json"
    if not file.is_file():
        raise CheckpointNotFoundError(f"no config.json in {file.parent}")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointNotFoundError(f"{file} is not valid JSON: {exc}") from exc


@contextlib.contextmanager
def atomic_write(target: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside `target`; it replaces `target` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the permissions open() would
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def clean_stale_temporaries(target: str | os.PathLike) -> None:
    """Remove `.NAME.*.tmp` / `.NAME.*.old` leftovers of writes to `target` that a crash interrupted."""
    target = Path(target)
    for leftover in target.parent.glob(f".{target.name}.*"):
        if leftover.suffix in (".tmp", ".old"):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; if the block succeeds it replaces `target` in one step (an
    atomic exchange of the two folders where the system offers it, else old-aside-then-new), otherwise it is
    deleted. A reader sees the old folder or the new one, never a mix. Leftovers of crashed writes are removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)
        if target.is_dir() and _exchange(tmp, target):
            shutil.rmtree(tmp, ignore_errors=True)  # now holds the old folder
        elif target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_READ_CHUNK_BYTES = 1024**2  # a cast reads the stored tensor through a buffer of this size


class TensorInfo(NamedTuple):
    """Where a stored tensor lives and what it is (from the file header: no tensor data read)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    offsets: tuple[int, int] | None  # byte range in a safetensors file (None for pickles)


class WeightFiles:
    """The weight files of one checkpoint folder, which file holds which key, and each tensor's dtype / shape.

    `stream` reads tensors one at a time, file after file, casting each as it is read (through a small buffer), so
    loading peaks near the size of the cast weights, never at the stored (e.g. float32) size.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self._headers: dict[str, dict[str, TensorInfo]] = {}
        if (folder / SAFE_INDEX).is_file():
            self.weight_map = self._read_index(folder / SAFE_INDEX)
        elif (folder / SAFE_SINGLE).is_file():
            self.weight_map = {k: SAFE_SINGLE for k in self.header(SAFE_SINGLE)}
        elif (folder / BIN_INDEX).is_file():
            self.weight_map = self._read_index(folder / BIN_INDEX)
        elif (folder / BIN_SINGLE).is_file():
            self.weight_map = {k: BIN_SINGLE for k in self.header(BIN_SINGLE)}
        else:
            raise CheckpointNotFoundError(f"no weights in {folder}: expected {SAFE_SINGLE}, {SAFE_INDEX}, "
                                          f"{BIN_SINGLE} or {BIN_INDEX}")

    @staticmethod
    def _read_index(file: Path) -> dict[str, str]:
        weight_map = json.loads(file.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointNotFoundError(f"{file} has no weight_map")
        folder = file.parent.resolve()
        outside = sorted({f for f in weight_map.values()
                          if not isinstance(f, str) or not (folder / f).resolve().is_relative_to(folder)})
        if outside:
            raise WeightLoadingError(f"{file} names shard files outside the checkpoint folder: {_short(outside)}")
        missing = sorted({f for f in weight_map.values() if not (file.parent / f).is_file()})
        if missing:
            raise CheckpointNotFoundError(f"{file} names shard files that are missing: {missing}")
        return weight_map

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def header(self, file: str) -> dict[str, TensorInfo]:
        """key -> TensorInfo of one weight file (safetensors: its JSON header; pickles: a memory-mapped load)."""
        if file not in self._headers:
            path = self.folder / file
            if file.endswith(".safetensors"):
                self._headers[file] = _safetensors_header(path)
            else:
                self._headers[file] = {k: TensorInfo(v.dtype, tuple(v.shape), None)
                                       for k, v in torch_load_state_dict(path).items()}
        return self._headers[file]

    def info(self, key: str) -> TensorInfo:
        """dtype and shape of a stored tensor, read from its file's header."""
        info = self.header(self.weight_map[key]).get(key)
        if info is None:
            raise WeightLoadingError(f"{self.weight_map[key]} does not hold {key!r} (named by the index)")
        return info

    def stream(self, keys: list[str] | None = None,
               dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(key, tensor) pairs for `keys` (all by default), file by file in storage order; floating tensors are cast
        to `dtype` as they are read."""
        keys = self.keys() if keys is None else keys
        by_file: dict[str, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.weight_map[key], []).append(key)
        buffers: dict[torch.dtype, torch.Tensor] = {}  # one read buffer per stored dtype, reused: no heap churn
        for file, file_keys in by_file.items():
            path = self.folder / file
            if file.endswith(".safetensors"):
                header = self.header(file)
                file_keys.sort(key=lambda k: self.info(k).offsets or (0, 0))
                data_start = _safetensors_data_start(path)
                with open(path, "rb", buffering=0) as fh:
                    for key in file_keys:
                        yield key, _read_safetensors_tensor(fh, data_start, header[key], dtype, f"{file}:{key}",
                                                            buffers)
            else:
                blob = torch_load_state_dict(path)
                for key in file_keys:
                    yield key, _cast(blob[key], dtype)
                del blob

    def load(self, keys: list[str] | None = None, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Load `keys` (all by default) into a dict, opening each shard once."""
        return dict(self.stream(keys, dtype))


def _safetensors_data_start(path: Path) -> int:
    with open(path, "rb") as fh:
        return 8 + int.from_bytes(fh.read(8), "little")


def _safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """key -> TensorInfo from the JSON header of a safetensors file (no tensor data read)."""
    try:
        with open(path, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            if not 0 < size <= min(100 * 1024**2, os.fstat(fh.fileno()).st_size):
                raise ValueError(f"header size {size}")
            raw = json.loads(fh.read(size))
        out = {}
        for key, entry in raw.items():
            if key == "__metadata__":
                continue
            begin, end = (int(o) for o in entry["data_offsets"])
            out[key] = TensorInfo(_SAFETENSORS_DTYPES[entry["dtype"]], tuple(int(d) for d in entry["shape"]),
                                  (begin, end))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise WeightLoadingError(f"{path} is not a readable safetensors file ({type(exc).__name__}: {exc})") from None
    return out


def _read_into(fh: Any, tensor: torch.Tensor, where: str) -> None:
    """Fill the contiguous CPU `tensor` with the next bytes of `fh`."""
    import ctypes

    nbytes = tensor.numel() * tensor.element_size()
    view = memoryview((ctypes.c_char * nbytes).from_address(tensor.data_ptr())).cast("B") if nbytes else b""
    done = 0
    while done < nbytes:
        n = fh.readinto(view[done:])
        if not n:
            raise WeightLoadingError(f"{where}: the file ends before the tensor's last byte (truncated download?)")
        done += n


def _read_safetensors_tensor(fh: Any, data_start: int, info: TensorInfo, dtype: torch.dtype | None,
                             where: str, buffers: dict[torch.dtype, torch.Tensor]) -> torch.Tensor:
    """Read one tensor with plain reads (no mmap: the stored bytes never stay resident); a cast goes through a small
    buffer, so only the cast tensor is ever allocated whole."""
    begin, end = info.offsets
    numel = _numel(list(info.shape))
    if numel * info.dtype.itemsize != end - begin:
        raise WeightLoadingError(f"{where}: header says {end - begin} bytes for shape {list(info.shape)} "
                                 f"{info.dtype}")
    fh.seek(data_start + begin)
    cast = dtype is not None and info.dtype.is_floating_point and dtype != info.dtype
    out = torch.empty(info.shape, dtype=dtype if cast else info.dtype)
    flat = out.reshape(-1)
    if not cast:
        _read_into(fh, flat, where)
        return out
    step = max(1, _READ_CHUNK_BYTES // info.dtype.itemsize)
    buffer = buffers.get(info.dtype)
    if buffer is None or buffer.numel() < min(step, numel):
        buffer = buffers[info.dtype] = torch.empty(step, dtype=info.dtype)
    for start in range(0, numel, step):
        chunk = buffer[: min(step, numel - start)]
        _read_into(fh, chunk, where)
        flat[start:start + chunk.numel()].copy_(chunk)
    return out


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
        return tensor.to(dtype)
    return tensor


def torch_load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a PyTorch pickle, read with `weights_only=True` (no code runs); `{'module': sd}` and
    `{'state_dict': sd}` wrappers (DeepSpeed, Lightning, mmengine) are unwrapped."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise
        blob = torch.load(path, map_location="cpu", weights_only=True)  # legacy (pre-zip) format cannot be mmapped
    for wrapper in ("module", "state_dict"):  # {'module': sd} (DeepSpeed), {'state_dict': sd} (Lightning, mmengine)
        if isinstance(blob, dict) and isinstance(blob.get(wrapper), dict):
            blob = blob[wrapper]
    if not isinstance(blob, dict):
        raise CheckpointNotFoundError(f"{path} does not hold a state dict")
    return blob


def load_state_dict(path: str | os.PathLike, prefix: str | None = None,
                    dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All weights of a checkpoint (or only the keys starting with `prefix`, keys kept as stored)."""
    files = WeightFiles(resolve_checkpoint(path))
    keys = [k for k in files.keys() if prefix is None or k.startswith(prefix)]
    return files.load(keys, dtype)


def save_state_dict(state_dict: dict[str, torch.Tensor], folder: str | os.PathLike,
                    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, metadata: dict[str, str] | None = None) -> None:
    """Write safetensors weights (sharded with an index past `max_shard_bytes`), each file atomically."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in state_dict.items():
        tensor = value.detach().to("cpu").contiguous()
        if tensor.data_ptr() in seen:  # tied weights share storage; safetensors wants each stored on its own
            tensor = tensor.clone()
        seen.add(tensor.data_ptr())
        tensors[key] = tensor
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    metadata = {"format": "pt", **(metadata or {})}
    for stale in list(folder.glob("model-*-of-*.safetensors")) + [folder / SAFE_INDEX, folder / SAFE_SINGLE]:
        if stale.exists():
            stale.unlink()
    if len(shards) == 1:
        with atomic_write(folder / SAFE_SINGLE) as tmp:
            save_file(shards[0], tmp, metadata=metadata)
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        with atomic_write(folder / name) as tmp:
            save_file(shard, tmp, metadata=metadata)
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with atomic_write(folder / SAFE_INDEX) as tmp:
        Path(tmp).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def count_checkpoint_parameters(path: str | os.PathLike) -> int:
    """Number of parameters stored in a checkpoint (read from the safetensors headers, no tensor loaded)."""
    files = WeightFiles(resolve_checkpoint(path))
    return sum(_numel(info.shape) for file in sorted(set(files.weight_map.values()))
               for info in files.header(file).values())


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """None / "auto" keep the stored dtype; strings like "bfloat16" / "bf16" map to torch dtypes."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"auto": None, "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
             "half": torch.float16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(names)}")
    return names[dtype]


def check_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], ignore: tuple[str, ...] = ()) -> None:
    """Raise WeightLoadingError naming every missing, unexpected or mis-shaped key."""
    expected = model.state_dict()
    ignored = [re.compile(p) for p in ignore]
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected and not any(p.search(k) for p in ignored)]
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
                  for k, v in state_dict.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_short(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {_short(mismatched)}")
    if problems:
        raise WeightLoadingError(f"weights do not fit {type(model).__name__}: " + "; ".join(problems))


def check_finite_weights(state: dict[str, torch.Tensor], where: str | os.PathLike = "checkpoint") -> None:
    """Raise WeightLoadingError naming every floating tensor that holds NaN or inf."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise WeightLoadingError(f"{where} holds non-finite weights (NaN or inf) in {len(bad)} tensors: {_short(bad)}")


def _select_by_prefix(prefixes: tuple[str, ...], wanted: list[str], stored: list[str]) -> tuple[str, list[str]]:
    """The first prefix under which some `wanted` key is stored, and the stored keys under it."""
    stored_set = set(stored)
    for prefix in prefixes:
        if any(prefix + k in stored_set for k in wanted):
            return prefix, [k for k in stored if k.startswith(prefix)]
    return prefixes[0], stored


def _short(items: list[str], limit: int = 12) -> str:
    head = ", ".join(items[:limit])
    return head + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def materialize_meta_buffers(model: nn.Module, device: torch.device | str) -> None:
    """Re-create modules whose buffers were left on the meta device (transformers' rotary embeddings: their
    `inv_freq` is computed, not stored) on `device`; any other meta buffer is an error naming it."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if ("RotaryEmbedding" in type(child).__name__ and hasattr(child, "config")
                    and any(b.is_meta for b in child.buffers())):
                with torch.device("cpu"):
                    fresh = type(child)(child.config)
                setattr(parent, name, fresh.to(device))
    left = [n for n, b in model.named_buffers() if b.is_meta]
    if left:
        raise WeightLoadingError(f"buffers not initialised after loading: {_short(left)}")


class PretrainedMixin:
    """`from_pretrained` / `save_pretrained` for every internvl-fm model (nn.Modules with a `config_class`).

    Loading: resolve the folder or hub id, read and check config.json (`check_config_dict`, `check_model_kind`),
    build the model on the meta device, read only the tensors it needs, convert them from the checkpoint's layout
    (`convert_checkpoint_state_dict`), assign them without a copy, then place the model (`device`, or
    `device_map` through accelerate) and attach what travels with it (`_after_load`: tokenizer, processor).
    Saving writes the official layout (`checkpoint_state_dict`, the inverse conversion), or with `layout="hf"`
    transformers' native one for the models that list it in `layouts` (`hf_state_dict`, `hf_config_dict`; loading
    it goes through `convert_hf_state_dict`, a stream, so fused tensors are assembled without a second model copy).

    Subclasses set `config_class`, `accepted_architectures`, `model_kind`, and may set `checkpoint_prefixes`
    (prefixes under which their weights may sit in a bigger checkpoint, tried in order) and `ignore_on_load`
    (regexes of stored keys to drop); they override the layout hooks below where their layout differs.
    """

    config_class: type = None  # type: ignore[assignment]
    accepted_architectures: tuple[str, ...] = ()  # architectures whose checkpoints hold this model's weights
    model_kind: str = "this model"  # how errors name what was asked for
    checkpoint_prefixes: tuple[str, ...] = ("",)
    ignore_on_load: tuple[str, ...] = (r"rotary_emb\.inv_freq$",)
    quantizable_modules: tuple[str, ...] = ()  # regexes of module names whose nn.Linear layers int8 replaces
    layouts: tuple[str, ...] = ("original",)  # checkpoint layouts this model reads and writes (see LAYOUTS)
    hf_checkpoint_prefixes: tuple[str, ...] = ("",)  # as checkpoint_prefixes, for -hf checkpoints

    # ---------------------------------------------------------------------------------------------- layout hooks
    def convert_checkpoint_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Checkpoint keys (official layout) -> this module's keys. Identity unless the layouts differ."""
        return state

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """This module's weights under the checkpoint keys (the inverse of `convert_checkpoint_state_dict`)."""
        return self.state_dict()

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """This module's weights under transformers' `-hf` keys (models listing "hf" in `layouts`)."""
        raise LayoutError(f"{type(self).__name__} has no transformers -hf layout")

    def hf_config_dict(self) -> dict[str, Any]:
        """The config.json of this model's `-hf` layout."""
        raise LayoutError(f"{type(self).__name__} has no transformers -hf layout")

    def convert_hf_state_dict(self, items: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """(stored `-hf` key, tensor) pairs -> (module key, tensor), lazily (the inverse of `hf_state_dict`)."""
        raise LayoutError(f"{type(self).__name__} has no transformers -hf layout")

    def _check_layout(self, layout: str) -> str:
        if layout not in self.layouts:
            raise LayoutError(f"{type(self).__name__} has no checkpoint layout {layout!r}; valid: "
                              f"{', '.join(repr(x) for x in self.layouts)}")
        return layout

    def _convert_stream(self, items: Iterable[tuple[str, torch.Tensor]],
                        layout: str) -> Iterator[tuple[str, torch.Tensor]]:
        """Stored (key, tensor) pairs of a `layout` checkpoint -> (module key, tensor) pairs, lazily."""
        if layout == "hf":
            yield from self.convert_hf_state_dict(items)
            return
        for key, tensor in items:
            yield from self.convert_checkpoint_state_dict({key: tensor}).items()

    def _prepare_load(self, stored_keys: list[str], layout: str) -> None:
        """Hook run before a checkpoint's keys are checked (e.g. decide weight tying from what is stored)."""

    def _tied_weights(self) -> dict[str, str]:
        """target key -> source key for weights shared with another (filled in when absent from the checkpoint)."""
        return {}

    def _after_load(self, folder: Path, load_tokenizer: bool) -> None:
        """Hook run after the weights are in place (attach tokenizer / processor...)."""

    def _quantize(self, quantization: str, device: torch.device) -> None:
        """Hook: quantise the model after its weights are loaded. torchao schemes (`internvl_fm.quantization`)
        replace the `quantizable_modules` linears still in full precision (a streaming load has already done so
        layer by layer); models override it for other schemes (the chat model's `bnb-int8`)."""
        from internvl_fm.quantization import quantize_modules

        quantize_modules(self, self._quantization_targets(quantization), quantization)

    def _quantization_targets(self, quantization: str) -> list[str]:
        """Names of the full-precision linears a torchao scheme replaces (QuantizationError when unsupported)."""
        from internvl_fm.quantization import QuantizationError, check_quantization, quantization_targets

        check_quantization(quantization)
        if not self.quantizable_modules:
            raise QuantizationError(f"{type(self).__name__} does not support quantization={quantization!r}")
        return quantization_targets(self, self.quantizable_modules)

    def _auto_device_map(self) -> dict[str, Any]:
        """The module -> device map that `device_map="auto"` means for this model."""
        from accelerate import infer_auto_device_map

        return infer_auto_device_map(self)

    def _save_extra(self, folder: Path) -> None:
        """Hook run before config.json is written: extra files (generation_config.json...), config updates."""

    # ---------------------------------------------------------------------------------------------- loading
    @classmethod
    def config_from_checkpoint(cls, path: str | os.PathLike) -> Any:
        """The checked config of a checkpoint folder or hub id (ConfigError / ModelKindError name the problem)."""
        from internvl_fm.configuration_utils import check_config_dict

        data = read_config(resolve_checkpoint(path))
        check_config_dict(data, str(path))
        check_model_kind(path, data, cls.accepted_architectures, cls.model_kind)
        return cls.config_class.from_dict(data)

    @classmethod
    def _select_keys(cls, model: nn.Module, stored: list[str]) -> tuple[str, list[str]]:
        return _select_by_prefix(cls.checkpoint_prefixes, list(model.state_dict()), stored)

    def _select_hf_keys(self, stored: list[str]) -> tuple[str, list[str]]:
        return _select_by_prefix(self.hf_checkpoint_prefixes, list(self.hf_state_dict()), stored)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype | str | None = None,
                        device: torch.device | str | None = None, config: Any = None,
                        device_map: str | dict[str, Any] | None = None, quantization: str | None = None,
                        load_tokenizer: bool = True, check_finite: bool = False):
        """Load a checkpoint folder or hub id.

        `dtype=None` keeps the stored dtype; `device` defaults to CPU; `device_map` ("auto" or module -> device,
        needs accelerate) spreads the model over several devices instead; `quantization` names a scheme the model
        supports ("int8": torchao int8 weights for the transformer blocks, applied layer by layer while loading, see
        `internvl_fm.quantization`; "none" / None: full precision); `load_tokenizer=False` skips the tokenizer
        files; `check_finite=True` refuses NaN / inf weights (WeightLoadingError naming the tensors).

        Keys and shapes are checked against the file headers before any tensor is read; tensors then stream in one
        at a time, cast to `dtype` as they are read, so loading peaks near the size of the final weights.
        Transformers-native `-hf` folders (see `layouts`) load too: their config.json says which layout they hold.
        """
        from internvl_fm.quantization import TORCHAO_SCHEMES, check_quantization

        quantization = None if quantization == "none" else quantization
        if quantization is not None and quantization != "bnb-int8":
            check_quantization(quantization)  # unknown names fail before anything is read
        folder = resolve_checkpoint(path)
        config = config if config is not None else cls.config_from_checkpoint(folder)
        layout = checkpoint_layout(read_config(folder))
        dtype = resolve_dtype(dtype)
        device = torch.device(device or ("cuda" if quantization == "bnb-int8" else "cpu"))
        if device_map is None:
            warn_if_slow_dtype(dtype, device)
        with torch.device("meta"):
            model = cls(config)
        streamed = quantization if quantization in TORCHAO_SCHEMES else None
        model._load_weights(WeightFiles(folder), dtype, quantization=streamed, check_finite=check_finite,
                            where=folder, layout=layout)
        if device_map is not None:
            materialize_meta_buffers(model, torch.device("cpu"))
            model._dispatch(device_map)
        else:
            materialize_meta_buffers(model, device)
            if quantization is not None and streamed is None:
                model._quantize(quantization, device)
            model.to(device)
        model._after_load(folder, load_tokenizer)
        model.name_or_path = str(path)
        return model.eval()

    def _load_weights(self, files: WeightFiles, dtype: torch.dtype | None = None, quantization: str | None = None,
                      check_finite: bool = False, where: str | os.PathLike = "checkpoint",
                      layout: str = "original") -> None:
        """Fill this meta-built model from `files` (a checkpoint in `layout`): check every key and shape from the
        headers, then stream the tensors in (cast as read, converted and assigned one by one; linears that
        `quantization` replaces are quantised as soon as their weights are in). An official-layout conversion that
        needs the whole state dict at once (per-tensor conversion disagrees with it) loads the whole dict instead."""
        from internvl_fm.quantization import quantize_modules

        self._check_layout(layout)
        stored = files.keys()
        prefix, keys = self._select_keys(self, stored) if layout == "original" else self._select_hf_keys(stored)
        self._prepare_load([k[len(prefix):] for k in keys], layout)
        streamable = self._check_checkpoint(files, prefix, keys, dtype, layout)
        pending = set(self._quantization_targets(quantization)) if quantization else set()
        tied = self._tied_weights()
        pending -= {key.rpartition(".")[0] for pair in tied.items() for key in pair}  # shared weights stay as is
        ignored = [re.compile(p) for p in self.ignore_on_load]
        bad: list[str] = []
        if streamable:
            def read() -> Iterator[tuple[str, torch.Tensor]]:
                for key, tensor in files.stream(keys, dtype):
                    if check_finite and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                        bad.append(key)
                    yield key[len(prefix):], tensor

            for name, value in self._convert_stream(read(), layout):
                if any(p.search(name) for p in ignored):
                    continue
                owner = _assign(self, name, value)
                del value
                if owner in pending and not any(p.is_meta for p in self.get_submodule(owner).parameters()):
                    release_freed_memory()  # quantisation temporaries go where the last ones were freed
                    quantize_modules(self, [owner], quantization)
                    pending.discard(owner)
            if bad:
                raise WeightLoadingError(f"{where} holds non-finite weights (NaN or inf) in {len(bad)} tensors: "
                                         f"{_short(bad)}")
            for target, source in tied.items():
                _set_param(self, target, _get_param(self, source))
        else:
            state = {k[len(prefix):]: v for k, v in files.load(keys, dtype).items()}
            if check_finite:
                check_finite_weights(state, where)
            self.load_converted_state_dict(self.convert_checkpoint_state_dict(state))
            del state
        if pending:
            quantize_modules(self, sorted(pending), quantization)
        release_freed_memory()

    def _check_checkpoint(self, files: WeightFiles, prefix: str, keys: list[str], dtype: torch.dtype | None,
                          layout: str = "original") -> bool:
        """Raise WeightLoadingError naming every missing, unexpected or mis-shaped key, from the file headers alone
        (meta tensors run through the layout conversion). True when the conversion works tensor by tensor (always
        for the -hf layout, whose conversion is a stream)."""
        def meta(key: str) -> torch.Tensor:
            info = files.info(key)
            cast = dtype if dtype is not None and info.dtype.is_floating_point else info.dtype
            return torch.empty(info.shape, dtype=cast, device="meta")

        stored = {k[len(prefix):]: meta(k) for k in keys}
        if layout != "original":
            check_state_dict(self, self._prepare_state(dict(self._convert_stream(stored.items(), layout))))
            return True
        whole = self._prepare_state(self.convert_checkpoint_state_dict(dict(stored)))
        check_state_dict(self, whole)
        per_key: dict[str, torch.Tensor] = {}
        try:
            for key, value in stored.items():
                per_key.update(self.convert_checkpoint_state_dict({key: value}))
        except Exception:  # noqa: BLE001 - a conversion that needs its neighbours: load the whole dict
            return False
        per_key = self._prepare_state(per_key)
        return per_key.keys() == whole.keys() and all(per_key[k].shape == whole[k].shape for k in whole)

    def _prepare_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Tied weights filled in from their source, `ignore_on_load` keys dropped."""
        for target, source in self._tied_weights().items():
            if target not in state and source in state:
                state[target] = state[source]
        ignored = [re.compile(p) for p in self.ignore_on_load]
        return {k: v for k, v in state.items() if not any(p.search(k) for p in ignored)}

    def _dispatch(self, device_map: str | dict[str, Any]) -> None:
        try:
            from accelerate import dispatch_model
        except ImportError as exc:
            raise ImportError("device_map needs the accelerate package: pip install 'internvl-fm[gpu]'") from exc
        if device_map in ("auto", "split"):
            device_map = self._auto_device_map()
        elif not isinstance(device_map, dict):
            raise ValueError(f"device_map must be 'auto' or a dict of module name -> device, got {device_map!r}")
        dispatch_model(self, device_map=device_map)

    def load_converted_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Check keys/shapes and assign the tensors (no copy), tying shared weights."""
        state = self._prepare_state(state)
        check_state_dict(self, state)
        self.load_state_dict(state, strict=True, assign=True)
        for target, source in self._tied_weights().items():
            _set_param(self, target, _get_param(self, source))

    # ---------------------------------------------------------------------------------------------- saving
    def save_pretrained(self, folder: str | os.PathLike, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                        layout: str = "original") -> Path:
        """Write config.json + safetensors weights (and the tokenizer, if attached) in `layout`: "original" (the
        OpenGVLab layout) or, for models listing it in `layouts`, "hf" (what transformers' own `save_pretrained`
        writes for `InternVLForConditionalGeneration` / `InternVLVisionModel`). Others raise LayoutError."""
        from internvl_fm.quantization import QuantizationError, is_quantized

        self._check_layout(layout)
        if is_quantized(self):
            raise QuantizationError(f"{type(self).__name__} holds int8-quantised layers, which are not saved: save the "
                                    "full-precision model and load it with quantization='int8' (quantisation "
                                    "happens while loading, layer by layer)")
        folder = Path(folder)
        self.config.extra["torch_dtype"] = str(next(self.parameters()).dtype).removeprefix("torch.")
        hf_config = self.hf_config_dict() if layout == "hf" else None  # config problems fail before any write
        with atomic_directory(folder) as tmp:  # kill -9 at any moment leaves the old checkpoint or the new one
            self._save_extra(tmp)
            if hf_config is not None:
                with atomic_write(tmp / "config.json") as config_tmp:
                    Path(config_tmp).write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
                save_state_dict(self.hf_state_dict(), tmp, max_shard_bytes=max_shard_bytes)
            else:
                self.config.save_pretrained(tmp)
                save_state_dict(self.checkpoint_state_dict(), tmp, max_shard_bytes=max_shard_bytes)
            tokenizer = getattr(self, "tokenizer", None)
            if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
                tokenizer.save_pretrained(tmp)
            _keep_other_files(folder, tmp)
        return folder


_CHECKPOINT_FILES = re.compile(r"^(config\.json|generation_config\.json|model(-\d+-of-\d+)?\.safetensors|"
                               r"model\.safetensors\.index\.json|pytorch_model.*\.bin(\.index\.json)?)$")


def _keep_other_files(old: Path, new: Path) -> None:
    """Carry files of `old` that a save does not write (a README, training logs...) into `new` (hard links when
    possible): a checkpoint folder is replaced, not its neighbours."""
    if not old.is_dir():
        return
    for item in old.iterdir():
        dest = new / item.name
        if dest.exists() or _CHECKPOINT_FILES.match(item.name):
            continue
        if item.is_dir():
            shutil.copytree(item, dest, copy_function=_link_or_copy)
        else:
            _link_or_copy(item, dest)


def _link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _assign(module: nn.Module, key: str, value: torch.Tensor) -> str:
    """Put `value` in place of the parameter / buffer `key` (no copy, as `load_state_dict(assign=True)`); returns
    the name of the module that holds it."""
    owner_name, _, name = key.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if name in owner._parameters:
        old = owner._parameters[name]
        owner._parameters[name] = nn.Parameter(value, requires_grad=old.requires_grad if old is not None else True)
    elif name in owner._buffers:
        owner._buffers[name] = value
    else:
        raise WeightLoadingError(f"{type(module).__name__} has no parameter or buffer {key!r}")
    return owner_name


def release_freed_memory() -> bool:
    """Hand freed heap pages back to the OS (glibc `malloc_trim`): freed CPU tensors otherwise stay in the RSS
    (glibc keeps them for reuse). False where unavailable (not glibc)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Any:
    import ctypes
    import ctypes.util

    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl)
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def _get_param(module: nn.Module, key: str) -> nn.Parameter:
    owner, _, name = key.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, name)


def _set_param(module: nn.Module, key: str, value: nn.Parameter) -> None:
    owner, _, name = key.rpartition(".")
    setattr(module.get_submodule(owner) if owner else module, name, value)


def check_model_kind(path: str | os.PathLike, config: dict[str, Any], accepted: tuple[str, ...],
                     wanted: str) -> None:
    """Raise ModelKindError when config.json names an architecture outside `accepted` (no architectures: no check;
    transformers' -hf names count as ours: InternVLForConditionalGeneration is an InternVLChatModel...).
    The message says what the folder holds and which class / command takes it."""
    archs = _architectures(config)
    if not archs or any(a in accepted for a in archs):
        return
    holds, use = MODEL_KINDS.get(archs[0], (f"a {archs[0]} model", f"one of {sorted(ARCHITECTURES)}"))
    raise ModelKindError(f"{path} holds {holds}, not {wanted}: use {use}")


def warn_if_slow_dtype(dtype: torch.dtype | None, device: torch.device | str | None) -> None:
    """float16 on the CPU runs, ~300x slower than bfloat16: say so (once per call site)."""
    if dtype == torch.float16 and torch.device(device or "cpu").type == "cpu":
        import warnings

        warnings.warn("float16 on the CPU is ~300x slower than bfloat16: use dtype bfloat16 (--dtype bfloat16)",
                      stacklevel=3)


def load(path: str | os.PathLike, **kwargs: Any):
    """Load any internvl-fm model; the class is picked from config.json `architectures`."""
    config = read_config(path)
    archs = _architectures(config)
    for arch in archs:
        if arch in ARCHITECTURES:
            module, _, name = ARCHITECTURES[arch].partition(":")
            return getattr(importlib.import_module(module), name).from_pretrained(path, **kwargs)
    raise ValueError(f"unsupported architectures {archs} in {path}; supported: {sorted(ARCHITECTURES)}")
