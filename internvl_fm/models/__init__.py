"""Model definitions: one model per file, each with its config dataclass."""
