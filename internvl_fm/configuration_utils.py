"""A small base for config dataclasses that read and write the official `config.json` files unchanged."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, ClassVar, TypeVar

C = TypeVar("C", bound="ConfigBase")

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

        return cls.from_dict(read_config(path))

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write `config.json` into `folder` (atomically)."""
        from internvl_fm.loading import atomic_write

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / "config.json"
        with atomic_write(target) as tmp:
            Path(tmp).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return target
