"""int8 weights through torchao, applied layer by layer while a checkpoint streams in.

`from_pretrained(..., quantization="int8")` replaces the transformer blocks' `nn.Linear` layers (the modules a model
lists in `quantizable_modules`) by :class:`Int8Linear` as soon as each layer's weights are loaded, so the
full-precision model is never whole in memory. Schemes:

- ``"int8"`` / ``"int8-weight-only"``: int8 weights with a per-channel scale, activations stay in the model dtype
  (torchao ``Int8WeightOnlyConfig``). ``"int8"`` picks this one: on CPU it is the faster of the two (measured on
  InternViT-300M / -6B linear shapes with torch 2.14 + torchao 0.18).
- ``"int8-dynamic"``: int8 weights and activations quantised per token at run time
  (``Int8DynamicActivationInt8WeightConfig``).

Embeddings, norms, heads and projectors keep the model dtype. Quantised models are not saved: store the
full-precision checkpoint and pass ``quantization=`` when loading it (``save_pretrained`` says so).
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from internvl_fm.errors import InternVLError

__all__ = ["QUANTIZATION_CHOICES", "TORCHAO_SCHEMES", "Int8Linear", "QuantizationError", "add_quantization_option",
           "check_quantization", "is_quantized",
           "quantize_linear", "quantize_modules", "quantization_targets"]

TORCHAO_SCHEMES = ("int8", "int8-weight-only", "int8-dynamic")
QUANTIZATION_CHOICES = ("none",) + TORCHAO_SCHEMES  # what `--quantization` accepts (`none`: full precision)
_ALIASES = {"int8": "int8-weight-only"}


class QuantizationError(InternVLError, ValueError):
    """An unknown quantisation scheme, a model that does not support one, or saving a quantised model."""


class Int8Linear(nn.Linear):
    """An `nn.Linear` whose weight is a torchao int8 tensor. A type of its own: code that reads raw weights of plain
    `nn.Linear` layers (the fused CPU path of InternViT) leaves it to its own forward."""

    scheme: str = "int8-weight-only"

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        rows = input.numel() // max(input.shape[-1], 1)
        if self.scheme == "int8-weight-only" and rows <= _INT8PACK_MAX_ROWS and _int8pack_supports(input, self.weight):
            return _int8pack_linear(input, self.weight, self.bias)
        return super().forward(input)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scheme={self.scheme}"


# torchao's weight-only linear converts the whole int8 weight to the activation dtype on every call, which makes
# it slower than bf16 when the activation is a few rows (decoding). torch's own CPU kernel `_weight_int8pack_mm`
# reads the int8 weight directly: 3-7x faster than torchao and 1.0-6x faster than bf16 at 1 row on InternVL2-2B-sized
# layers; from ~8 rows on the torchao path is faster (measured with torch 2.14 / torchao 0.18, AVX512-BF16 CPU).
_INT8PACK_MAX_ROWS = 4


def _int8pack_supports(input: torch.Tensor, weight: Any) -> bool:
    per_row = getattr(weight, "block_size", (0,))[-1] == weight.shape[-1]  # one scale per output channel
    return (per_row and input.device.type == "cpu" and input.dtype in (torch.bfloat16, torch.float32)
            and hasattr(torch.ops.aten, "_weight_int8pack_mm"))


def _int8pack_linear(input: torch.Tensor, weight: Any, bias: torch.Tensor | None) -> torch.Tensor:
    """`input @ dequant(weight).T + bias` with torch's int8 weight-only CPU kernel (per-output-channel scales)."""
    qdata, scale = weight.qdata, weight.scale
    rows = input.reshape(-1, input.shape[-1])
    output = torch.ops.aten._weight_int8pack_mm(rows.contiguous(), qdata, scale.reshape(-1).to(input.dtype))
    if bias is not None:
        output = output + bias.to(output.dtype)
    return output.reshape(*input.shape[:-1], qdata.shape[0])


def check_quantization(quantization: str | None) -> str | None:
    """The canonical torchao scheme for `quantization` (None / "none": no quantisation); QuantizationError for
    anything else."""
    if quantization in (None, "none"):
        return None
    if quantization not in TORCHAO_SCHEMES:
        raise QuantizationError(f"unknown quantization {quantization!r}; use one of {TORCHAO_SCHEMES}")
    return _ALIASES.get(quantization, quantization)


def _torchao_config(scheme: str):
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig
    except ImportError as exc:
        raise ImportError("quantization='int8' needs the torchao package: pip install 'internvl-fm[quant]'") from exc
    return Int8DynamicActivationInt8WeightConfig() if scheme == "int8-dynamic" else Int8WeightOnlyConfig()


def quantize_linear(linear: nn.Linear, quantization: str) -> Int8Linear:
    """An :class:`Int8Linear` holding `linear`'s weight quantised with `quantization` (and its bias as is)."""
    scheme = check_quantization(quantization)
    if scheme is None:
        raise ValueError("quantize_linear needs a quantization scheme")
    if type(linear) is not nn.Linear:
        raise TypeError(f"only plain nn.Linear layers are quantised, got {type(linear).__name__}")
    if linear.weight.is_meta:
        raise ValueError("cannot quantise a linear layer whose weight is not loaded (meta tensor)")
    from torchao.quantization import quantize_

    quantize_(linear, _torchao_config(scheme))  # replaces linear.weight by an int8 tensor subclass, in place
    with torch.device("meta"):
        layer = Int8Linear(linear.in_features, linear.out_features, bias=False)
    layer.weight = linear.weight
    layer.bias = linear.bias
    layer.scheme = scheme
    layer.train(linear.training)
    return layer


def quantization_targets(model: nn.Module, patterns: Iterable[str]) -> list[str]:
    """Names of the plain `nn.Linear` modules of `model` whose name matches one of the regexes `patterns`."""
    compiled = [re.compile(p) for p in patterns]
    return [name for name, module in model.named_modules()
            if type(module) is nn.Linear and any(p.search(name) for p in compiled)]


def quantize_modules(model: nn.Module, names: Iterable[str], quantization: str) -> None:
    """Replace the `nn.Linear` submodules `names` of `model` by their :class:`Int8Linear`."""
    for name in names:
        owner, _, attr = name.rpartition(".")
        parent = model.get_submodule(owner) if owner else model
        setattr(parent, attr, quantize_linear(getattr(parent, attr), quantization))


def is_quantized(model: nn.Module) -> bool:
    """Whether `model` holds torchao-quantised layers."""
    return any(isinstance(m, Int8Linear) for m in model.modules())


QUANTIZATION_HELP = ("int8: torchao int8 weights for the transformer blocks (about half the memory of bfloat16, "
                     "embeddings cosine >= 0.999; on CPU faster than bfloat16 for chat decoding, slower for batched encoding), "
                     "quantised while loading; "
                     "int8-dynamic also quantises activations; none: full precision")


def add_quantization_option(parser: Any, default: str | None = "none") -> None:
    """`--quantization {none,int8,...}` for commands that load a model (pass the value to `from_pretrained`);
    `default=None` lets a saved setting (an index's) apply unless the option is given."""
    help_ = QUANTIZATION_HELP if default is not None else QUANTIZATION_HELP + " (default: as the index was built)"
    parser.add_argument("--quantization", default=default, choices=QUANTIZATION_CHOICES, help=help_)
