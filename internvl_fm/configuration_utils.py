"""A small base for config dataclasses that read and write the official `config.json` files unchanged."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, ClassVar, TypeVar

C = TypeVar("C", bound="ConfigBase")

# Upper bounds on size fields of any (nested) config: far above every released model, low enough that a typo such
# as num_hidden_layers 1000000 is refused before a model is built, instead of running until the OOM killer.
SIZE_LIMITS = {
    "num_hidden_layers": 1024, "hidden_size": 65536, "intermediate_size": 1 << 20, "num_attention_heads": 4096,
    "num_key_value_heads": 4096, "vocab_size": 1 << 24, "num_query_token": 65536, "image_size": 16384,
    "force_image_size": 16384, "max_position_embeddings": 1 << 24, "max_dynamic_patch": 1024,
}

# Keys of the official configs that only make sense with their remote code; dropped when we write a config.
_DROPPED_ON_SAVE = {"auto_map", "_commit_hash", "_name_or_path", "transformers_version"}


@dataclasses.dataclass
class ConfigBase:
    """Base of every config dataclass: `from_dict` keeps unknown keys in `extra` so a round trip loses nothing."""

    model_type: ClassVar[str] = ""
    architecture: ClassVar[str] = ""
    extra: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)} - {"extra"}

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        """Build from a config dict; unknown keys are kept in `extra`."""
        if not isinstance(data, dict):
            raise TypeError(f"{cls.__name__}.from_dict expects a dict, got {type(data).__name__}")
        names = cls.field_names()
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names and k != "model_type"}
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """The dict written to config.json (official field names)."""
        out = {k: v for k, v in self.extra.items() if k not in _DROPPED_ON_SAVE}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if isinstance(value, ConfigBase) else value
        out["model_type"] = self.model_type
        if self.architecture:
            out["architectures"] = [self.architecture]
        return out

    @classmethod
    def from_pretrained(cls: type[C], path: str | os.PathLike) -> C:
        """Read `config.json` from a checkpoint folder, a hub id, or a path to the json file itself."""
        from internvl_fm.loading import read_config

        data = read_config(path)
        check_config_dict(data, str(path))
        return cls.from_dict(data)

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write `config.json` into `folder` (atomically)."""
        from internvl_fm.loading import atomic_write

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / "config.json"
        with atomic_write(target) as tmp:
            Path(tmp).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return target


def is_transformers_hf_layout(data: dict[str, Any]) -> bool:
    """True for a transformers-native `-hf` InternVL folder (InternVLForConditionalGeneration / InternVLVisionModel)."""
    archs = data.get("architectures") or []
    if "text_config" in data and (data.get("model_type") == "internvl" or "InternVLModel" in archs):
        return True  # the official InternVL-C/G config is also model_type "internvl", but has qllama_config
    return "InternVLForConditionalGeneration" in archs or data.get("model_type") == "internvl_vision"


def check_config_dict(data: dict[str, Any], where: str = "config.json") -> None:
    """Refuse configs we cannot build (size fields past `SIZE_LIMITS`) with ConfigError, before anything is
    allocated. Transformers `-hf` configs pass: the config classes convert them (`internvl_fm.convert`)."""
    from internvl_fm.errors import ConfigError

    if not isinstance(data, dict):
        raise ConfigError(f"{where}: config.json must hold a JSON object")
    _check_sizes(data, where, "")


def _check_sizes(data: dict[str, Any], where: str, path: str) -> None:
    from internvl_fm.errors import ConfigError

    for key, value in data.items():
        if isinstance(value, dict):
            _check_sizes(value, where, f"{path}{key}.")
        elif key in SIZE_LIMITS and value is not None:
            values = value if isinstance(value, (list, tuple)) and value else [value]  # -hf: [height, width]
            if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= SIZE_LIMITS[key]
                       for v in values):
                raise ConfigError(f"{where}: {path}{key} = {value!r} is not a plausible model size "
                                  f"(expected an integer in 0..{SIZE_LIMITS[key]})")
