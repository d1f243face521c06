"""InternViT: the vision encoder of every InternVL model (6B and 300M styles), official key names."""
from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.modeling_outputs import BaseModelOutputWithPooling

from internvl_fm.convert import VISION_KEYS, vision_config_to_hf
from internvl_fm.loading import PretrainedMixin, release_freed_memory
from internvl_fm.models.configuration_intern_vit import ATTN_IMPLEMENTATIONS, InternVisionConfig

logger = logging.getLogger(__name__)


class InternRMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back before the weight (as the reference)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        x = hidden_states.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


_ONEDNN_OPS_WORK: dict[torch.dtype, bool] = {}  # dtype -> probe result (see _onednn_ops_work)


def _probe_onednn_ops(dtype: torch.dtype) -> None:
    """Run every private `torch.ops.mkldnn` call of the fused path once on tiny tensors and check the results against
    plain torch; raises if an op is missing, fails or disagrees."""
    ops = torch.ops.mkldnn
    linear, reorder = ops._linear_pointwise, ops._reorder_linear_weight
    # deterministic inputs (the global RNG is left alone); [1, 4, 16] @ [32, 16]^T as the layers call it
    x = torch.linspace(-1, 1, 64).reshape(1, 4, 16).to(dtype)
    weight = torch.linspace(-0.5, 0.5, 512).reshape(32, 16).flip(1).contiguous().to(dtype)
    bias = torch.linspace(-0.1, 0.1, 32).to(dtype)
    packed = reorder(weight, 4)
    if not torch.equal(packed.to_dense(), weight):
        raise RuntimeError("unpacking a packed weight does not give the weight back")
    ref = F.linear(x.float(), weight.float(), bias.float())
    got = (linear(x, packed, bias, "none", [], ""), linear(x, packed, bias, "gelu", [], "none"),
           linear(x, weight, bias, "none", [], ""))
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for name, out, expected in zip(("linear", "linear+gelu", "linear (unpacked)"), got, (ref, F.gelu(ref), ref)):
        if out.shape != expected.shape or not torch.allclose(out.float(), expected, atol=tol, rtol=tol):
            raise RuntimeError(f"{name} disagrees with plain torch")


def _onednn_ops_work(dtype: torch.dtype) -> bool:
    """Whether the fused path's oneDNN ops exist and give correct results for `dtype` in this torch build (they are
    private API); probed once per dtype, cached."""
    ok = _ONEDNN_OPS_WORK.get(dtype)
    if ok is None:
        try:
            if not torch.backends.mkldnn.is_available():
                raise RuntimeError("torch.backends.mkldnn is not available")
            with torch.no_grad(), torch.autocast("cpu", enabled=False):
                _probe_onednn_ops(dtype)
            ok = True
        except Exception as err:  # noqa: BLE001 - any failure means: use the plain path
            logger.debug("InternViT: fused oneDNN CPU path disabled for %s (%s: %s); using the plain path",
                         dtype, type(err).__name__, err)
            ok = False
        _ONEDNN_OPS_WORK[dtype] = ok
    return ok


def _onednn_fusable(x: torch.Tensor) -> bool:
    """Whether the fused oneDNN inference kernels apply (CPU tensors of float32 / bfloat16, working ops)."""
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and _onednn_ops_work(x.dtype)


def build_norm(config: InternVisionConfig, dim: int) -> nn.Module:
    if config.norm_type == "rms_norm":
        return InternRMSNorm(dim, eps=config.layer_norm_eps)
    return nn.LayerNorm(dim, eps=config.layer_norm_eps)


class InternVisionEmbeddings(nn.Module):
    """Patch embedding + class token + position embedding (bicubic-interpolated to the input grid every call)."""

    def __init__(self, config: InternVisionConfig):
        super().__init__()
        self.embed_dim = config.hidden_size
        self.image_size = config.image_size
        self.patch_size = config.patch_size
        self.class_embedding = nn.Parameter(torch.randn(1, 1, self.embed_dim))
        self.patch_embedding = nn.Conv2d(3, self.embed_dim, kernel_size=self.patch_size, stride=self.patch_size)
        num_positions = (self.image_size // self.patch_size) ** 2 + 1
        self.position_embedding = nn.Parameter(torch.randn(1, num_positions, self.embed_dim))

    def _patch_pos_embed(self, height: int, width: int) -> torch.Tensor:
        pos = self.position_embedding[:, 1:]
        grid = self.image_size // self.patch_size
        target_dtype = pos.dtype
        pos = pos.float().reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
        pos = F.interpolate(pos, size=(height, width), mode="bicubic", align_corners=False)
        return pos.reshape(1, -1, height * width).permute(0, 2, 1).to(target_dtype)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        target_dtype = self.patch_embedding.weight.dtype
        patch_embeds = self.patch_embedding(pixel_values)  # [B, C, h, w]
        batch, _, height, width = patch_embeds.shape
        patch_embeds = patch_embeds.flatten(2).transpose(1, 2)
        class_embeds = self.class_embedding.expand(batch, 1, -1).to(target_dtype)
        embeddings = torch.cat([class_embeds, patch_embeds], dim=1)
        position = torch.cat([self.position_embedding[:, :1], self._patch_pos_embed(height, width)], dim=1)
        return embeddings + position.to(target_dtype)


class InternAttention(nn.Module):
    """Multi-head self-attention with fused qkv and optional full-width RMS qk-norm."""

    def __init__(self, config: InternVisionConfig):
        super().__init__()
        self.embed_dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(self.embed_dim, 3 * self.embed_dim, bias=config.qkv_bias)
        self.attn_drop = config.attention_dropout
        self.proj_drop = nn.Dropout(config.dropout)
        self.qk_normalization = config.qk_normalization
        if self.qk_normalization:
            self.q_norm = InternRMSNorm(self.embed_dim, eps=config.layer_norm_eps)
            self.k_norm = InternRMSNorm(self.embed_dim, eps=config.layer_norm_eps)
        self.proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.attn_implementation = "auto"

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.proj_drop(self.proj(self.attend(hidden_states)))

    def attend(self, hidden_states: torch.Tensor, qkv=None) -> torch.Tensor:
        """Attention output with heads merged, before `proj` ([B, N, C]); `qkv` may replace the qkv projection."""
        batch, seq, _ = hidden_states.shape
        q, k, v = (qkv or self.qkv)(hidden_states).chunk(3, dim=-1)
        if self.qk_normalization:
            q, k = self.q_norm(q), self.k_norm(k)
        shape = (batch, seq, self.num_heads, self.head_dim)
        q, k, v = (t.reshape(shape).transpose(1, 2) for t in (q, k, v))
        dropout = self.attn_drop if self.training else 0.0
        impl = self.attn_implementation
        if impl == "auto":  # CPU inference: cache-friendly eager math; otherwise SDPA (flash / efficient kernels)
            impl = "eager" if q.device.type == "cpu" and not torch.is_grad_enabled() else "sdpa"
        if impl == "flash_attention_2" and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            from flash_attn import flash_attn_func  # optional, checked by set_attn_implementation

            out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout)
            return out.reshape(batch, seq, self.embed_dim)
        if impl == "eager":
            return eager_attention(q, k, v, self.scale, dropout)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        return out.transpose(1, 2).reshape(batch, seq, self.embed_dim)


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                    dropout: float = 0.0) -> torch.Tensor:
    """softmax(q k^T * scale) v for [B, H, N, d] inputs -> [B, N, H*d].

    Without autograd the batch is processed one sample at a time: the [H, N, N] scores of one sample stay in cache,
    which on CPU is ~2x faster than materialising the scores of the whole batch.
    """
    batch, heads, seq, dim = q.shape
    if torch.is_grad_enabled() or dropout:
        attn = ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        if dropout:
            attn = F.dropout(attn, p=dropout)
        return (attn @ v).transpose(1, 2).reshape(batch, seq, heads * dim)
    out = q.new_empty(batch, seq, heads, dim)
    for b in range(batch):
        scores = torch.matmul(q[b], k[b].transpose(-2, -1)).mul_(scale).softmax(dim=-1)
        out[b].copy_(torch.matmul(scores, v[b]).transpose(0, 1))
    return out.reshape(batch, seq, heads * dim)


class InternMLP(nn.Module):
    def __init__(self, config: InternVisionConfig):
        super().__init__()
        if config.hidden_act not in ("gelu",):
            raise ValueError(f"unsupported hidden_act {config.hidden_act!r} (InternViT uses exact 'gelu')")
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(hidden_states)))


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth per sample (identity in eval mode)."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class InternVisionEncoderLayer(nn.Module):
    """Pre-norm transformer block with layer scale: x + ls1 * attn(norm1(x)); x + ls2 * mlp(norm2(x))."""

    def __init__(self, config: InternVisionConfig, drop_path_rate: float = 0.0):
        super().__init__()
        dim = config.hidden_size
        self.attn = InternAttention(config)
        self.mlp = InternMLP(config)
        self.norm1 = build_norm(config, dim)
        self.norm2 = build_norm(config, dim)
        self.ls1 = nn.Parameter(config.initializer_factor * torch.ones(dim))
        self.ls2 = nn.Parameter(config.initializer_factor * torch.ones(dim))
        self.drop_path_rate = drop_path_rate
        self._packed: tuple[tuple[nn.Linear, torch.Tensor], ...] | None = None  # in-place packed weights (`_pack`)
        self.register_state_dict_post_hook(self._dense_state_dict)
        self.register_load_state_dict_pre_hook(self._unpack_before_load)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() and self._fusable and _onednn_fusable(hidden_states):
            return self._forward_fused(hidden_states)
        self._unpack()  # autograd / another device or dtype after a fused eval forward: dense weights again
        x = hidden_states
        x = x + drop_path(self.attn(self.norm1(x).to(x.dtype)) * self.ls1, self.drop_path_rate, self.training)
        x = x + drop_path(self.mlp(self.norm2(x).to(x.dtype)) * self.ls2, self.drop_path_rate, self.training)
        return x

    @property
    def _fusable(self) -> bool:
        """The fused path reads weights directly: only for plain nn.Linear layers (not LoRA / quantised wrappers)."""
        return all(type(m) is nn.Linear for m in self._linears())

    def _linears(self) -> tuple[nn.Linear, ...]:
        return self.attn.qkv, self.attn.proj, self.mlp.fc1, self.mlp.fc2

    def _pack(self, rows: int) -> tuple[torch.Tensor, ...]:
        """Repack the four Linear weights in oneDNN's blocked layout *in place*: the packed tensor replaces the
        parameter's storage (the parameter object stays, empty, until `_unpack`), so the weights are held once.
        Done on the first fused forward of a model in eval mode; one layer's weight is copied at a time. The
        Linear modules are remembered with their packed weights, so unpacking works even after a module was
        wrapped (LoRA, a quantised wrapper) in the meantime."""
        if self._packed is None:
            packed = []
            for linear in self._linears():
                packed.append((linear, torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach().contiguous(),
                                                                               rows)))
                linear.weight.data = linear.weight.new_empty(0)
            self._packed = tuple(packed)
        return tuple(weight for _, weight in self._packed)

    def _unpack(self) -> None:
        """Put the dense (official-layout, bit-identical) weights back into the Linear parameters."""
        if self._packed is not None:
            for linear, packed in self._packed:
                linear.weight.data = packed.to_dense()
            self._packed = None

    def _forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        """CPU inference through oneDNN: bias + GELU fused into fc1, the layer scale and residual applied in place on
        the GEMM outputs (the plain path's operation order). In eval mode the weights are packed in place once
        (`_pack`); in train mode (no autograd) the dense weights are read as they are."""
        linear = torch.ops.mkldnn._linear_pointwise
        if self.training and self._packed is None:
            qkv_w, proj_w, fc1_w, fc2_w = (m.weight if m.weight.is_contiguous() else m.weight.contiguous()
                                           for m in self._linears())
        else:
            qkv_w, proj_w, fc1_w, fc2_w = self._pack(x.shape[0] * x.shape[1])
        attn = self.attn.attend(self.norm1(x).to(x.dtype),
                                qkv=lambda h: linear(h, qkv_w, self.attn.qkv.bias, "none", [], ""))
        x = linear(attn, proj_w, self.attn.proj.bias, "none", [], "").mul_(self.ls1).add_(x)
        hidden = linear(self.norm2(x).to(x.dtype), fc1_w, self.mlp.fc1.bias, "gelu", [], "none")
        return linear(hidden, fc2_w, self.mlp.fc2.bias, "none", [], "").mul_(self.ls2).add_(x)

    def release_inference_cache(self) -> None:
        """Restore the dense weights (undo the in-place packing of the fused CPU path)."""
        self._unpack()

    # the packed layout is an inference detail: everything else sees the dense official weights
    def train(self, mode: bool = True) -> InternVisionEncoderLayer:
        if mode:
            self._unpack()
        return super().train(mode)

    def _apply(self, fn, recurse: bool = True):  # .to() / .float() / .cuda() / .half() move the dense weights
        self._unpack()
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:  # deepcopy / pickle / torch.save(model): oneDNN tensors cannot be serialised
        self._unpack()
        return super().__getstate__()

    @staticmethod
    def _dense_state_dict(module: InternVisionEncoderLayer, state_dict: dict, prefix: str, _metadata) -> None:
        if module._packed is not None:
            names = {id(sub): name for name, sub in module.named_modules()}
            for linear, packed in module._packed:
                key = f"{prefix}{names.get(id(linear), '?')}.weight"
                if key in state_dict:
                    state_dict[key] = packed.to_dense()

    @staticmethod
    def _unpack_before_load(module: InternVisionEncoderLayer, *_args) -> None:
        module._unpack()


class InternVisionEncoder(nn.Module):
    def __init__(self, config: InternVisionConfig):
        super().__init__()
        n = config.num_hidden_layers
        rates = [config.drop_path_rate * i / (n - 1) if n > 1 else 0.0 for i in range(n)]
        self.layers = nn.ModuleList(InternVisionEncoderLayer(config, r) for r in rates)
        self.gradient_checkpointing = False

    def run_layer(self, layer: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(layer, hidden_states, use_reentrant=False)
        return layer(hidden_states)


def _check_pixel_values(pixel_values: torch.Tensor) -> None:
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
    if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
        raise ValueError(f"pixel_values must have shape [batch, 3, height, width], got {tuple(pixel_values.shape)}")


class InternVisionModel(PretrainedMixin, nn.Module):
    """InternViT encoder. `pooler_output` is the CLS token of the last block (no final norm, no head)."""

    config_class = InternVisionConfig
    accepted_architectures = ("InternVisionModel", "InternVLModel", "InternVLChatModel", "transformers.InternVLModel")
    model_kind = "an InternViT vision encoder"
    checkpoint_prefixes = ("", "vision_model.")
    quantizable_modules = (r"^encoder\.layers\.\d+\.",)  # quantization="int8": the blocks' linears
    layouts = ("original", "hf")  # hf: transformers' InternVLVisionModel (and the vision tower of -hf InternVL)
    hf_checkpoint_prefixes = ("", "vision_tower.", "model.vision_tower.")

    def __init__(self, config: InternVisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = InternVisionEmbeddings(config)
        self.encoder = InternVisionEncoder(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.embeddings.patch_embedding.weight.dtype

    # transformers' InternVLVisionModel layout (`save_pretrained(folder, layout="hf")`, -hf folders load as they are)
    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        return VISION_KEYS.to_hf(self.state_dict())

    def hf_config_dict(self) -> dict:
        return {**vision_config_to_hf(self.config.to_dict()), "architectures": ["InternVLVisionModel"]}

    def convert_hf_state_dict(self, items: Iterable[tuple[str, torch.Tensor]]
                              ) -> Iterator[tuple[str, torch.Tensor]]:
        return VISION_KEYS.from_hf(items)

    @property
    def device(self) -> torch.device:
        return self.embeddings.patch_embedding.weight.device

    def forward(self, pixel_values: torch.Tensor | None = None, output_hidden_states: bool = False,
                pixel_embeds: torch.Tensor | None = None, return_dict: bool = True) -> BaseModelOutputWithPooling:
        """Encode `pixel_values` [B, 3, H, W] (any size: position embeddings are interpolated)."""
        if pixel_embeds is not None:
            hidden_states = pixel_embeds
        else:
            if pixel_values is None:
                raise ValueError("pass pixel_values or pixel_embeds")
            _check_pixel_values(pixel_values)
            hidden_states = self.embeddings(pixel_values.to(self.dtype))
        all_states = [hidden_states] if output_hidden_states else None
        for layer in self.encoder.layers:
            hidden_states = self.encoder.run_layer(layer, hidden_states)
            if all_states is not None:
                all_states.append(hidden_states)
        return BaseModelOutputWithPooling(
            last_hidden_state=hidden_states,
            pooler_output=hidden_states[:, 0, :],
            hidden_states=tuple(all_states) if all_states is not None else None,
        )

    def forward_intermediates(self, pixel_values: torch.Tensor, indices: list[int]) -> list[torch.Tensor]:
        """Outputs [B, 1+h*w, C] of the blocks in `indices` (0-based, negative allowed); stops after the last one."""
        _check_pixel_values(pixel_values)
        depth = len(self.encoder.layers)
        wanted = []
        for i in indices:
            j = i + depth if i < 0 else i
            if not 0 <= j < depth:
                raise ValueError(f"block index {i} out of range for {depth} layers")
            wanted.append(j)
        hidden_states = self.embeddings(pixel_values.to(self.dtype))
        found: dict[int, torch.Tensor] = {}
        for idx, layer in enumerate(self.encoder.layers[: max(wanted) + 1]):
            hidden_states = self.encoder.run_layer(layer, hidden_states)
            if idx in wanted:
                found[idx] = hidden_states
        return [found[j] for j in wanted]

    @torch.no_grad()
    def resize_pos_embeddings(self, image_size: int) -> None:
        """Permanently resize the stored position embedding to `image_size` (bicubic, CLS kept)."""
        emb = self.embeddings
        grid = image_size // emb.patch_size
        if image_size == emb.image_size:
            return
        patch = emb._patch_pos_embed(grid, grid)
        new = torch.cat([emb.position_embedding[:, :1], patch], dim=1)
        emb.position_embedding = nn.Parameter(new, requires_grad=emb.position_embedding.requires_grad)
        emb.image_size = image_size
        self.config.image_size = image_size

    def gradient_checkpointing_enable(self) -> None:
        self.encoder.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.encoder.gradient_checkpointing = False

    def set_attn_implementation(self, name: str) -> None:
        """Choose the attention kernel: "auto" (default: eager math for CPU inference, SDPA otherwise), "sdpa",
        "eager", or "flash_attention_2" (CUDA, if installed)."""
        if name not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"unknown attention implementation {name!r}; choose from {ATTN_IMPLEMENTATIONS}")
        if name == "flash_attention_2":
            import importlib.util

            if importlib.util.find_spec("flash_attn") is None:
                raise ImportError("attn_implementation='flash_attention_2' needs the flash-attn package")
        for layer in self.encoder.layers:
            layer.attn.attn_implementation = name

    def release_inference_cache(self) -> bool:
        """Restore the dense weights packed in place by the fused CPU path (it holds no second copy, so this frees
        nothing by itself) and return memory freed by past forwards to the OS (`malloc_trim` where glibc has it;
        returns whether it did)."""
        for layer in self.encoder.layers:
            layer.release_inference_cache()
        return release_freed_memory()

    def num_parameters(self) -> int:
        packed = sum(t.numel() for layer in self.encoder.layers if layer._packed is not None for _, t in layer._packed)
        return sum(p.numel() for p in self.parameters()) + packed

    def _init_weights(self, module: nn.Module) -> None:
        """Initialisation for training from scratch (checkpoints overwrite it)."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, InternVisionEmbeddings):
            nn.init.trunc_normal_(module.class_embedding, std=std)
            nn.init.trunc_normal_(module.position_embedding, std=std)

    def init_weights(self) -> "InternVisionModel":
        self.apply(self._init_weights)
        return self
