"""InternImage in PyTorch, structured like transformers' own vision models (ConvNeXt, Swin).

Inside every level the blocks carry (N, H*W, C) tokens: the official code's channels-last (N, H, W, C) memory,
flattened; convolutions and the DCN op read 4-D views of it. Public outputs (hidden states, feature maps) are
channels-first (N, C, H, W) like every transformers vision model.

Why tokens rather than (N, H, W, C) maps: under torch.compile on the CPU, inductor's layout optimisation gives
every 4-D tensor upstream of a convolution `channels_last` strides computed from its own shape, as if dim 1 were
channels. An (N, H, W, C) map so laid out has H innermost (every LayerNorm reduces over strided channels, every
GEMM input is copied back); compiled InternImage-T ran at 0.77x its eager speed. Rank-3 tensors keep their layout.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.backbone_utils import BackboneMixin, filter_output_hidden_states
from transformers.integrations import use_kernel_forward_from_hub
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BackboneOutput,
    BaseModelOutputWithPoolingAndNoAttention,
    ImageClassifierOutputWithNoAttention,
)
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_internimage import InternImageConfig
from .ops import DCNv3Core, DCNv3KernelWarning, DCNv4Core, dcnv4_offset_mask_channels, use_reference


@use_kernel_forward_from_hub("InternImageLinear")
class InternImageLinear(nn.Linear):
    """nn.Linear that `kernels.kernelize` can give a faster CPU forward (internimage_hf.ops.cpu_layers)."""


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth per sample (the residual branch is dropped for a random subset of the batch)."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    return x * x.new_empty(shape).bernoulli_(keep).div_(keep)


class InternImageDropPath(nn.Module):
    def __init__(self, rate: float = 0.0):
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.rate, self.training)

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


def to_channels_first(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 1, 2)


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1)


def to_map(tokens: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, H*W, C) tokens as an (N, H, W, C) map (a view where the strides allow: always, in the model)."""
    return tokens.reshape(tokens.shape[0], size[0], size[1], tokens.shape[-1])


class InternImageConvNorm(nn.Module):
    """Conv2d on a channels-first input followed by a channels-last LayerNorm (output channels-last)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int,
        bias: bool,
        eps: float,
        groups: int = 1,
    ):
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=(kernel_size - 1) // 2,
            groups=groups,
            bias=bias,
        )
        self.norm = nn.LayerNorm(out_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(to_channels_last(self.conv(x)))


class InternImageEmbeddings(nn.Module):
    """Stem: two stride-2 3x3 convolutions (3 -> C/2 -> C) with LayerNorm and GELU; output (N, H/4, W/4, C)."""

    def __init__(self, config: InternImageConfig):
        super().__init__()
        channels = config.channels
        self.num_channels = config.num_channels
        self.conv1 = nn.Conv2d(config.num_channels, channels // 2, 3, stride=2, padding=1)
        self.norm1 = nn.LayerNorm(channels // 2, eps=config.layer_norm_eps)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(channels // 2, channels, 3, stride=2, padding=1)
        self.norm2 = nn.LayerNorm(channels, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # GELU runs on the channels-first view, as in the official stem: vectorised GELU rounds differently
        # depending on memory layout, and this keeps float32 results bit-identical to the official model.
        x = self.act(to_channels_first(self.norm1(to_channels_last(self.conv1(pixel_values)))))
        return self.norm2(to_channels_last(self.conv2(x)))


class InternImageDepthwiseConv(InternImageConvNorm):
    """Depthwise conv + LayerNorm + GELU that produces the features DCNv3 predicts offsets and masks from."""

    def __init__(self, channels: int, kernel_size: int, eps: float):
        super().__init__(channels, channels, kernel_size, stride=1, bias=True, eps=eps, groups=channels)
        self.act = nn.GELU()

    def forward(self, tokens: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:  # tokens in and out
        return self.act(super().forward(to_channels_first(to_map(tokens, size))).flatten(1, 2))


class InternImageDCNv3(nn.Module):
    """DCNv3 layer: input projection, offset/mask prediction, deformable sampling (`DCNv3Core`), output projection."""

    def __init__(self, config: InternImageConfig, channels: int, groups: int):
        super().__init__()
        self.channels = channels
        self.groups = groups
        self.group_channels = channels // groups
        self.kernel_size = config.kernel_size
        self.offset_scale = config.offset_scale
        self.remove_center = int(config.remove_center)
        self.points = self.kernel_size**2 - self.remove_center

        self.dw_conv = InternImageDepthwiseConv(channels, config.dw_kernel_size, config.layer_norm_eps)
        self.offset = InternImageLinear(channels, groups * self.points * 2)
        self.mask = InternImageLinear(channels, groups * self.points)
        self.input_proj = InternImageLinear(channels, channels)
        self.output_proj = InternImageLinear(channels, channels, bias=config.dcn_output_bias)
        self.core = DCNv3Core()
        self.recompute_sampling_parameters = config.recompute_sampling_parameters
        # Gate between the deformable output and the plain projection (InternImage-H/G), one value per group.
        self.center_feature_scale_proj = InternImageLinear(channels, groups) if config.center_feature_scale else None
        # Official init, read by `_init_weights` whatever order it visits modules in: every point starts on the
        # regular grid with weight 1/P, the gate at 0.5, and the projections are xavier-uniform.
        for linear in (self.offset, self.mask, self.center_feature_scale_proj):
            if linear is not None:
                linear._internimage_init = "zeros"
        self.input_proj._internimage_init = self.output_proj._internimage_init = "xavier"

    def sampling_parameters(self, hidden_states: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, ...]:
        """Offsets, mask logits and (H/G) the centre-feature gate (tokens), predicted from the depthwise branch."""
        features = self.dw_conv(hidden_states, size)
        offset = self.offset(features)
        mask = self.mask(features)
        if self.center_feature_scale_proj is None:
            return offset, mask
        return offset, mask, torch.sigmoid(self.center_feature_scale_proj(features))

    def forward(self, hidden_states: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(N, H*W, C) tokens of an H x W map (`size`) in and out; the op reads (N, H, W, C) views of them."""
        x = self.input_proj(hidden_states)
        if self.recompute_sampling_parameters and self.training and torch.is_grad_enabled():
            # The branch's intermediates (conv, norm and GELU outputs, mask logits) are about a fifth of a
            # layer's saved activations and cheap to recompute: keep only its outputs, which the op saves anyway.
            params = checkpoint(self.sampling_parameters, hidden_states, size, use_reentrant=False)
        else:
            params = self.sampling_parameters(hidden_states, size)
        offset, mask = params[0], params[1]
        # The mask is passed as logits: the op takes the softmax over each group's points (fused into the compiled
        # kernel; the reference computes it in float32 at least, as the official code does).
        pad = (self.kernel_size - 1) // 2
        out = self.core(
            to_map(x, size),
            to_map(offset, size),
            to_map(mask, size),
            self.kernel_size,
            self.kernel_size,
            1,
            1,
            pad,
            pad,
            1,
            1,
            self.groups,
            self.group_channels,
            self.offset_scale,
            self.remove_center,
            mask_softmax=True,
        ).flatten(1, 2)
        if self.center_feature_scale_proj is not None:
            scale = params[2].repeat_interleave(self.group_channels, dim=-1)
            out = out * (1 - scale) + x * scale
        return self.output_proj(out)


class InternImageDCNv4(nn.Module):
    """DCNv4 layer (FlashInternImage): value projection, offset/mask prediction, deformable sampling with the mask
    used as is (`DCNv4Core`), output projection. Submodules keep the official names, so checkpoints map 1:1."""

    kernel_size = 3  # FlashInternImage builds every DCNv4 layer 3x3, stride 1, pad 1, dilation 1, centre kept
    points = 9

    def __init__(self, config: InternImageConfig, channels: int, groups: int):
        super().__init__()
        self.channels = channels
        self.groups = groups
        self.group_channels = channels // groups
        self.offset_scale = config.offset_scale
        self.value_proj = InternImageLinear(channels, channels)
        # S/B/L: a depthwise conv with bias and no norm or activation in front of offset_mask.
        self.offset_mask_dw = None
        if config.dw_kernel_size is not None:
            size = config.dw_kernel_size
            self.offset_mask_dw = nn.Conv2d(channels, channels, size, padding=(size - 1) // 2, groups=channels)
        # One Linear for offsets and mask, padded to a multiple of 8 outputs; the padding columns are never read.
        self.offset_mask = InternImageLinear(channels, dcnv4_offset_mask_channels(groups, self.points))
        self.output_proj = InternImageLinear(channels, channels, bias=config.dcn_output_bias)
        # No centre-feature gate: the official model never passes center_feature_scale to DCNv4.
        self.core = DCNv4Core()
        # Official init (read by `_init_weights`): every point starts on the regular grid with a zero mask, the
        # projections are xavier-uniform.
        self.offset_mask._internimage_init = "zeros"
        self.value_proj._internimage_init = self.output_proj._internimage_init = "xavier"

    def forward(self, hidden_states: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(N, H*W, C) tokens of an H x W map (`size`) in and out; the op reads (N, H, W, C) views of them."""
        x = self.value_proj(hidden_states)
        # Offsets and mask come from this layer's input (norm1(x) in pre-norm, the raw block input in post-norm).
        features = hidden_states
        if self.offset_mask_dw is not None:
            features = self.offset_mask_dw(to_channels_first(to_map(hidden_states, size)))
            features = to_channels_last(features).flatten(1, 2)
        offset_mask = self.offset_mask(features)
        out = self.core(
            to_map(x, size),
            to_map(offset_mask, size),
            self.kernel_size,
            self.kernel_size,
            1,  # stride_h
            1,  # stride_w
            1,  # pad_h
            1,  # pad_w
            1,  # dilation_h
            1,  # dilation_w
            self.groups,
            self.group_channels,
            self.offset_scale,
            0,  # remove_center
        )
        return self.output_proj(out.flatten(1, 2))


@use_kernel_forward_from_hub("InternImageMLP")
class InternImageMLP(nn.Module):
    def __init__(self, config: InternImageConfig, channels: int):
        super().__init__()
        hidden = int(channels * config.mlp_ratio)
        self.fc1 = InternImageLinear(channels, hidden)
        self.act = nn.GELU()
        self.fc2 = InternImageLinear(hidden, channels, bias=config.mlp_fc2_bias)
        self.dropout = nn.Dropout(config.drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.dropout(self.act(self.fc1(x)))))


class InternImageLayer(GradientCheckpointingLayer):
    """One block: DCN branch (DCNv3 or DCNv4, `config.core_op`) and MLP branch, each residual, in the variant's
    normalisation arrangement."""

    def __init__(self, config: InternImageConfig, channels: int, groups: int, drop_path_rate: float):
        super().__init__()
        eps = config.layer_norm_eps
        self.post_norm = config.post_norm
        self.norm1 = nn.LayerNorm(channels, eps=eps)
        dcn = InternImageDCNv4 if config.core_op == "DCNv4" else InternImageDCNv3
        self.dcn = dcn(config, channels, groups)
        self.norm2 = nn.LayerNorm(channels, eps=eps)
        self.mlp = InternImageMLP(config, channels)
        self.drop_path = InternImageDropPath(drop_path_rate)
        self.layer_scale1 = self.layer_scale2 = None
        self.res_post_norm1 = self.res_post_norm2 = None
        if config.layer_scale is not None:
            self.layer_scale1 = nn.Parameter(torch.full((channels,), config.layer_scale))
            self.layer_scale2 = nn.Parameter(torch.full((channels,), config.layer_scale))
        if config.res_post_norm:  # the official model builds them even where layer scale or post-norm win
            self.res_post_norm1 = nn.LayerNorm(channels, eps=eps)
            self.res_post_norm2 = nn.LayerNorm(channels, eps=eps)
        self.use_res_post_norm = config.res_post_norm and config.layer_scale is None and not config.post_norm

    def _branch(self, x: torch.Tensor, fn: nn.Module, norm: nn.Module, res_norm, scale, *args) -> torch.Tensor:
        if self.post_norm:
            y = norm(fn(x, *args))
        else:
            y = fn(norm(x), *args)
            if self.use_res_post_norm:
                y = res_norm(y)
        if scale is not None:
            y = scale * y
        return x + self.drop_path(y)

    def forward(self, hidden_states: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(N, H*W, C) tokens of an H x W map (`size`) in and out."""
        x = self._branch(hidden_states, self.dcn, self.norm1, self.res_post_norm1, self.layer_scale1, size)
        return self._branch(x, self.mlp, self.norm2, self.res_post_norm2, self.layer_scale2)


class InternImageLevel(nn.Module):
    """A level: its layers, optional post-norms (level 2 of H/G) and level norm; downsampling is separate."""

    def __init__(self, config: InternImageConfig, index: int, drop_path_rates: list[float]):
        super().__init__()
        channels = config.hidden_sizes[index]
        eps = config.layer_norm_eps
        self.layers = nn.ModuleList(
            InternImageLayer(config, channels, config.groups[index], rate) for rate in drop_path_rates
        )
        self.post_norm_ids: list[int] = []
        self.post_norms = None
        if index == 2 and config.level2_post_norm:
            self.post_norm_ids = list(config.level2_post_norm_block_ids)
            self.post_norms = nn.ModuleList(nn.LayerNorm(channels, eps=eps) for _ in self.post_norm_ids)
        self.norm = nn.LayerNorm(channels, eps=eps) if config.level_norm else None
        self.downsample = None
        if index < config.num_stages - 1:
            self.downsample = InternImageConvNorm(channels, 2 * channels, 3, stride=2, bias=False, eps=eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The level's output before downsampling; channels-first in and out (views of channels-last memory), the
        blocks in between on (N, H*W, C) tokens (module docstring).

        Taking and returning the channels-first tensors the model reports as hidden states keeps those tensors on
        the computation path (gradients reach them, output hooks see them); the permutes are free views.
        """
        size = (hidden_states.shape[2], hidden_states.shape[3])
        tokens = to_channels_last(hidden_states).flatten(1, 2)
        for i, layer in enumerate(self.layers):
            tokens = layer(tokens, size)
            if self.post_norms is not None and i in self.post_norm_ids:
                tokens = self.post_norms[self.post_norm_ids.index(i)](tokens)
        if self.norm is not None:
            tokens = self.norm(tokens)
        return to_channels_first(to_map(tokens, size))


class InternImageEncoder(nn.Module):
    def __init__(self, config: InternImageConfig):
        super().__init__()
        rates = torch.linspace(0, config.drop_path_rate, sum(config.depths), device="cpu").tolist()
        self.levels = nn.ModuleList()
        start = 0
        for index, depth in enumerate(config.depths):
            self.levels.append(InternImageLevel(config, index, rates[start : start + depth]))
            start += depth

    def forward(self, hidden_states: torch.Tensor) -> list[torch.Tensor]:
        """Per-level outputs before downsampling, channels-first; each is the tensor the next step consumes.

        A level's downsampling belongs to that level (official weight names) but runs here, after its output.
        """
        outputs = []
        for level in self.levels:
            hidden_states = level(hidden_states)
            outputs.append(hidden_states)
            if level.downsample is not None:
                hidden_states = to_channels_first(level.downsample(hidden_states))
        return outputs


class InternImageConvPooler(nn.Module):
    """T-XL head trunk: 1x1 conv to 1.5 x 8C, BatchNorm, GELU, global average pool."""

    def __init__(self, config: InternImageConfig):
        super().__init__()
        channels = config.hidden_sizes[-1]
        self.conv = nn.Conv2d(channels, config.pooled_size, 1, bias=False)
        self.norm = nn.BatchNorm2d(config.pooled_size)
        self.act = nn.GELU()

    def forward(self, level_outputs: list[torch.Tensor]) -> torch.Tensor:
        x = self.act(self.norm(self.conv(level_outputs[-1])))
        return x.mean(dim=(-2, -1))


class InternImageAttentionPool(nn.Module):
    """Attention pooling (official "clip projector"): the mean token queries all tokens."""

    def __init__(self, dim: int, out_dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.norm_q = nn.LayerNorm(dim, eps=eps)
        self.norm_k = nn.LayerNorm(dim, eps=eps)
        self.norm_v = nn.LayerNorm(dim, eps=eps)
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.k_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, out_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, length, dim = tokens.shape
        heads = self.num_heads
        q = F.linear(self.norm_q(tokens.mean(1, keepdim=True)), self.q.weight, self.q_bias)
        k = F.linear(self.norm_k(tokens), self.k.weight, self.k_bias)
        v = F.linear(self.norm_v(tokens), self.v.weight, self.v_bias)
        q = q.view(batch, 1, heads, -1).transpose(1, 2) * self.scale
        k = k.view(batch, length, heads, -1).transpose(1, 2)
        v = v.view(batch, length, heads, -1).transpose(1, 2)
        attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(batch, dim)
        return self.proj(out)


class InternImageAttentionPooler(nn.Module):
    """H/G head trunk: fuse stage 4 (1x1 conv + pixel shuffle) with stage 3, attention-pool, LayerNorm."""

    def __init__(self, config: InternImageConfig):
        super().__init__()
        dim = config.projector_dim
        self.stage4_proj = nn.Conv2d(config.hidden_sizes[-1], dim * 4, 1)
        self.upsample = nn.PixelShuffle(2)
        self.stage3_proj = nn.Conv2d(config.hidden_sizes[-2], dim, 1)
        self.attention = InternImageAttentionPool(
            dim, config.projector_out_dim, config.projector_num_heads, config.layer_norm_eps
        )
        self.norm = nn.LayerNorm(config.projector_out_dim, eps=config.layer_norm_eps)

    def forward(self, level_outputs: list[torch.Tensor]) -> torch.Tensor:
        stage4 = self.upsample(self.stage4_proj(level_outputs[-1]))
        stage3 = self.stage3_proj(level_outputs[-2])
        if stage4.shape[-2:] != stage3.shape[-2:]:
            raise ValueError(
                f"InternImage-H/G need stage 3 to be exactly twice stage 4 (input sides that are multiples of 32); "
                f"got stage 3 {tuple(stage3.shape[-2:])} and stage 4 x2 {tuple(stage4.shape[-2:])}"
            )
        tokens = (stage4 + stage3).flatten(2).transpose(1, 2)
        return self.norm(self.attention(tokens))


def _kernelizes_by_default() -> bool:
    """Whether `from_pretrained` kernelizes unless told `use_kernels=False` (transformers >= 5.25)."""
    import transformers

    try:
        major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    except ValueError:
        return True
    return (major, minor) >= (5, 25)


_KERNELIZE_BY_DEFAULT = _kernelizes_by_default()


def _transformers_kernels_usable() -> bool:
    """Whether transformers accepts the installed `kernels` for `set_use_kernels(True)` (its own check)."""
    from transformers import modeling_utils

    check = getattr(modeling_utils, "is_kernels_available", None)
    return check is None or bool(check())


class InternImagePreTrainedModel(PreTrainedModel):
    config_class = InternImageConfig
    base_model_prefix = "internimage"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["InternImageLayer"]
    _can_record_outputs = {"hidden_states": InternImageLevel}  # plus the first level's input: the stem output

    def set_use_kernels(self, use_kernels, *args, **kwargs):
        """transformers' hook after `from_pretrained` (`use_kernels=...`) and on `kernels_mode` changes. `True`
        kernelizes (the DCNv3 layers get the compiled kernel layer, or the reference after one warning); `False`
        puts the DCNv3 layers on the reference where transformers kernelizes by default (>= 5.25, so `False` was
        asked for). Before 5.25 `False` is the default and keeps the layers as built (compiled op if available)."""
        if use_kernels and not _transformers_kernels_usable():
            # e.g. transformers 5.25 (kernelizes by default, needs kernels >= 0.19.1) with kernels 0.18.3: its
            # from_pretrained would raise; the layers stay as built (compiled op through the loader) instead.
            warnings.warn(
                "transformers cannot kernelize with the installed `kernels` (it needs a newer release); the DCNv3 "
                "layers keep their own dispatch (the compiled op if available). To fix: install the `kernels` "
                "version transformers asks for, or pass use_kernels=False.",
                DCNv3KernelWarning,
                stacklevel=3,
            )
            return None
        if not use_kernels and _KERNELIZE_BY_DEFAULT:
            use_reference(self)
        return super().set_use_kernels(use_kernels, *args, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Official init: trunc-normal Linear, xavier DCNv3/DCNv4 projections, zero offset/mask/gate, layer scale."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            rule = getattr(module, "_internimage_init", None)
            if rule == "zeros":
                init.zeros_(module.weight)
            elif rule == "xavier":
                init.xavier_uniform_(module.weight)
            else:
                init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            # PyTorch's default, which the official code keeps for its convolutions.
            init.kaiming_uniform_(module.weight, a=5**0.5)
            if module.bias is not None:
                fan_in = module.weight[0].numel()
                init.uniform_(module.bias, -(fan_in**-0.5), fan_in**-0.5)
        elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            if isinstance(module, nn.BatchNorm2d):
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)
                init.zeros_(module.num_batches_tracked)
        elif isinstance(module, InternImageLayer) and module.layer_scale1 is not None:
            init.constant_(module.layer_scale1, self.config.layer_scale)
            init.constant_(module.layer_scale2, self.config.layer_scale)
        elif isinstance(module, InternImageAttentionPool):
            for bias in (module.q_bias, module.k_bias, module.v_bias):
                init.zeros_(bias)

    def _stages(self, pixel_values: torch.Tensor | None, pooled: bool) -> list[torch.Tensor]:
        """Validate the input, run stem and levels: [stem output, level 1, ..., level 4], each NCHW."""
        self._check_pixel_values(pixel_values)
        if pooled and self.config.use_clip_projector:
            height, width = pixel_values.shape[-2:]
            if height % 32 or width % 32:
                raise ValueError(
                    f"InternImage-H/G classify images whose sides are multiples of 32; got {height}x{width}. "
                    f"Resize or crop (e.g. to {self.config.image_size}x{self.config.image_size})."
                )
        embedding_output = to_channels_first(self.embeddings(pixel_values))
        return [embedding_output] + self.encoder(embedding_output)

    def _check_pixel_values(self, pixel_values: torch.Tensor | None) -> None:
        """Turn the mistakes users make into one readable sentence instead of a shape error deep inside."""
        if pixel_values is None:
            raise ValueError("You have to specify pixel_values")
        if not torch.is_tensor(pixel_values):
            raise ValueError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
        if pixel_values.dim() != 4:
            raise ValueError(
                f"pixel_values must have shape (batch, {self.config.num_channels}, height, width); got a "
                f"{pixel_values.dim()}-d tensor of shape {tuple(pixel_values.shape)}"
            )
        if pixel_values.shape[1] != self.config.num_channels:
            hint = (
                " (channels-last input? permute it to (N, C, H, W))"
                if pixel_values.shape[-1] == self.config.num_channels
                else ""
            )
            raise ValueError(
                f"pixel_values must have {self.config.num_channels} channels in dimension 1; got shape "
                f"{tuple(pixel_values.shape)}{hint}"
            )
        if not pixel_values.is_floating_point():
            raise ValueError(f"pixel_values must be a floating-point tensor, got {pixel_values.dtype}")
        dtype = self.embeddings.conv1.weight.dtype
        if pixel_values.dtype != dtype and not torch.is_autocast_enabled(pixel_values.device.type):
            raise ValueError(
                f"pixel_values are {pixel_values.dtype} but the model's weights are {dtype}: convert one to the other "
                f"(pixel_values.to({dtype}) or model.to({pixel_values.dtype})), or run under torch.autocast"
            )
        height, width = pixel_values.shape[-2:]
        if height < 32 or width < 32:
            raise ValueError(
                f"InternImage needs images of at least 32x32 pixels (its output stride); got {height}x{width}"
            )


class InternImageModel(InternImagePreTrainedModel):
    """Trunk plus the variant's pooling head: `pooler_output` is the embedding the classifier reads."""

    def __init__(self, config: InternImageConfig):
        super().__init__(config)
        self.embeddings = InternImageEmbeddings(config)
        self.encoder = InternImageEncoder(config)
        self.pooler = InternImageAttentionPooler(config) if config.use_clip_projector else InternImageConvPooler(config)
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self, pixel_values: torch.Tensor | None = None, **kwargs: Unpack[TransformersKwargs]
    ) -> BaseModelOutputWithPoolingAndNoAttention:
        # hidden_states (stem output, then each level's output; NCHW) are captured by hooks on the levels.
        level_outputs = self._stages(pixel_values, pooled=True)[1:]
        return BaseModelOutputWithPoolingAndNoAttention(
            last_hidden_state=level_outputs[-1], pooler_output=self.pooler(level_outputs)
        )


class InternImageForImageClassification(InternImagePreTrainedModel):
    """InternImage with a linear classifier on the pooled embedding (official `head`)."""

    accepts_loss_kwargs = False

    def __init__(self, config: InternImageConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.internimage = InternImageModel(config)
        self.classifier = nn.Linear(config.pooled_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> ImageClassifierOutputWithNoAttention:
        outputs: BaseModelOutputWithPoolingAndNoAttention = self.internimage(pixel_values, **kwargs)
        logits = self.classifier(outputs.pooler_output)
        loss = None
        if labels is not None:
            loss = self.loss_function(labels=labels, pooled_logits=logits, config=self.config)
        return ImageClassifierOutputWithNoAttention(loss=loss, logits=logits, hidden_states=outputs.hidden_states)


class InternImageBackbone(BackboneMixin, InternImagePreTrainedModel):
    """Multi-scale features for detection/segmentation necks: each level's output before downsampling, NCHW."""

    has_attentions = False
    # A classification checkpoint's pooling head and classifier are not part of the backbone: expected, not reported.
    _keys_to_ignore_on_load_unexpected = [r"^(internimage\.)?pooler\.", r"^classifier\."]

    def __init__(self, config: InternImageConfig):
        super().__init__(config)
        self.embeddings = InternImageEmbeddings(config)
        self.encoder = InternImageEncoder(config)
        self.num_features = [config.channels] + config.hidden_sizes
        self.post_init()

    @can_return_tuple
    @filter_output_hidden_states
    def forward(self, pixel_values: torch.Tensor | None = None, **kwargs: Unpack[TransformersKwargs]) -> BackboneOutput:
        stages = self._stages(pixel_values, pooled=False)
        feature_maps = tuple(x for name, x in zip(self.stage_names, stages) if name in self.out_features)
        return BackboneOutput(feature_maps=feature_maps, hidden_states=tuple(stages), attentions=None)


__all__ = [
    "InternImageBackbone",
    "InternImageForImageClassification",
    "InternImageModel",
    "InternImagePreTrainedModel",
]
