"""The reference CoAtNet: the seed model of the CoAtNet blog post, module for module.

Same constructor defaults, module tree, parameter and buffer names, initialisation and
arithmetic as the seed (``tests/seed_coatnet.py`` holds it verbatim), with its defects
mended where a square input's result does not change:
- ``torch.meshgrid`` gets ``indexing="ij"`` (the seed's implicit default);
- the final pool is ``AvgPool2d((H/32, W/32))`` rather than ``AvgPool2d(H/32)``, so non-square
  inputs work;
- an image size that is not a multiple of 32, or an input of another size, is a ValueError.
Additions that leave the state dict alone: per-stage ``heads`` (the paper's family uses
width / 32), stochastic depth, and the ``backend`` of the fused ops.
"""
from __future__ import annotations

import numbers
from collections import OrderedDict
from typing import Sequence, Tuple, Union

import torch
import torch.nn as nn
from einops import rearrange

from ..ops import dispatch
from ..ops.rel_bias_attention import rel_bias_attention, relative_position_index
from .layers import ConvBN, DWConvBNGELU, FusedOpModule, MaxPool2d, drop_path, drop_path_scale, set_backend


def conv_3x3_bn(in_c, out_c, image_size, downsample=False, **_unused):
    """S0 stem layer: 3x3 conv (stride 2 when downsampling), BatchNorm, GELU; the seed's
    Sequential, whose BatchNorm + GELU run as one op on fused backends."""
    stride = 2 if downsample else 1
    return ConvBN(in_c, out_c, 3, stride, gelu=True)


class SE(nn.Module):
    """Squeeze-excitation: global average pool, bottleneck MLP, sigmoid gate."""

    def __init__(self, in_c, out_c, expansion=0.25):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(
            nn.Linear(out_c, int(in_c * expansion), bias=False),
            nn.GELU(),
            nn.Linear(int(in_c * expansion), out_c, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x):
        b, c, _, _ = x.size()
        return self.excite(x, self.avg_pool(x).view(b, c))

    def excite(self, x, squeezed):
        """Scale x by the gate computed from its channel means ``squeezed`` [B, C]."""
        b, c = squeezed.shape
        return x * self.gate(squeezed, x.dtype).view(b, c, 1, 1)

    def gate(self, squeezed, dtype):
        """The per-image channel gate [B, C] from the channel means ``squeezed``, in ``dtype``."""
        return self.fc(squeezed.to(dtype))


class MBConv(nn.Module):
    """Inverted bottleneck: 1x1 expand (stride 2 when downsampling), 3x3 depthwise, SE, 1x1 project."""

    # On fused backends SE's gate goes into the projection's weights (``gated_pointwise_conv``)
    # rather than multiplying the activation; False keeps the multiply (benchmarks compare).
    se_gate_in_projection = True

    def __init__(self, in_c, out_c, image_size, downsample=False, expansion=4, drop_path_rate=0.0, **_unused):
        super().__init__()
        self.downsample = downsample
        self.drop_path_rate = drop_path_rate
        stride = 2 if downsample else 1
        hidden_dim = int(in_c * expansion)

        if self.downsample:
            self.downsample_layer = nn.Sequential(
                MaxPool2d(kernel_size=3, stride=2, padding=1),
                nn.Conv2d(in_c, out_c, 1, 1, 0, bias=False),
            )

        layers = OrderedDict()
        layers["expand_conv"] = ConvBN(in_c, hidden_dim, 1, stride, gelu=True)  # 1x1 conv, BN, GELU
        layers["dw_conv"] = DWConvBNGELU(hidden_dim)
        layers["se"] = SE(in_c, hidden_dim)
        layers["pro_conv"] = ConvBN(hidden_dim, out_c, 1, gelu=False)  # 1x1 conv, BN
        self.block = nn.Sequential(layers)

    def forward(self, x):
        shortcut = self.downsample_layer(x) if self.downsample else x
        blk = self.block
        if blk.dw_conv.backend == "eager" and blk.pro_conv.backend == "eager":
            # The seed's Sequential, op for op.
            return shortcut + drop_path(blk(x), self.drop_path_rate, self.training)
        # Fused backends hand SE its squeeze from the depthwise kernel's epilogue, fold its gate
        # into the projection's weights (SE never re-reads the activation), and add the residual
        # in the projection's BatchNorm pass.
        h, squeezed = blk.dw_conv.forward_pooled(blk.expand_conv(x))
        scale = drop_path_scale(h, self.drop_path_rate, self.training)
        if not self.se_gate_in_projection:
            return blk.pro_conv(blk.se.excite(h, squeezed), residual=shortcut, branch_scale=scale)
        gate = blk.se.gate(squeezed, h.dtype)
        return blk.pro_conv.forward_gated(h, gate, residual=shortcut, branch_scale=scale)


class Attention(nn.Module, FusedOpModule):
    """Multi-head self-attention over the whole window with a learned relative-position bias."""

    fused_op = "rel_bias_attention"

    def __init__(self, in_c, out_c, image_size, heads=8, dim_head=32, dropout=0.0, backend="eager"):
        super().__init__()
        inner_dim = dim_head * heads
        project_out = not (heads == 1 and dim_head == in_c)
        self.ih, self.iw = image_size if len(image_size) == 2 else (image_size, image_size)
        self.heads = heads
        self.scale = dim_head ** -0.5
        self.backend = backend

        self.relative_bias_table = nn.Parameter(torch.zeros((2 * self.ih - 1) * (2 * self.iw - 1), heads))
        # The seed's [N*N, 1] index buffer; kept so its checkpoints load unchanged. The op
        # recomputes the same offsets from the window (fused kernels compute them in-kernel).
        self.register_buffer("relative_index", relative_position_index(self.ih, self.iw).flatten().unsqueeze(1))

        # Kept so the module tree is the seed's; the op applies the softmax itself.
        self.attend = nn.Softmax(dim=-1)
        self.qkv = nn.Linear(in_c, inner_dim * 3, bias=False)
        self.proj = nn.Sequential(nn.Linear(inner_dim, out_c), nn.Dropout(dropout)) if project_out else nn.Identity()

    def forward(self, x):
        # [B, N, 3 * heads * d] -> three strided [B, heads, N, d] views of the one projection.
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)
        out = rel_bias_attention(q, k, v, self.relative_bias_table, (self.ih, self.iw), self.scale, backend=self.backend)
        out = rearrange(out, "b h n d -> b n (h d)")
        return self.proj(out)


class FFN(nn.Module):
    def __init__(self, dim, hidden_dim, dropout=0.0):
        super().__init__()
        self.ffn = nn.Sequential(
            nn.Linear(dim, hidden_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, dim),
            nn.Dropout(dropout),
        )

    def forward(self, x):
        return self.ffn(x)


class Transformer(nn.Module):
    """Pre-norm Transformer block on a feature map; max-pools by 2 when downsampling."""

    def __init__(self, in_c, out_c, image_size, heads=8, dim_head=32, downsample=False, dropout=0.0,
                 expansion=4, norm_layer=nn.LayerNorm, drop_path_rate=0.0):
        super().__init__()
        self.downsample = downsample
        self.drop_path_rate = drop_path_rate
        hidden_dim = int(in_c * expansion)
        self.ih, self.iw = image_size

        if self.downsample:
            self.pool1 = MaxPool2d(kernel_size=3, stride=2, padding=1)
            self.pool2 = MaxPool2d(kernel_size=3, stride=2, padding=1)
            self.proj = nn.Conv2d(in_c, out_c, 1, 1, 0, bias=False)

        self.attn = Attention(in_c, out_c, image_size, heads, dim_head, dropout)
        self.ffn = FFN(out_c, hidden_dim)
        self.norm1 = norm_layer(in_c)
        self.norm2 = norm_layer(out_c)

    def forward(self, x):
        x1 = self.pool1(x) if self.downsample else x
        x1 = rearrange(x1, "b c h w -> b (h w) c")
        x1 = self.attn(self.norm1(x1))
        x1 = rearrange(x1, "b (h w) c -> b c h w", h=self.ih, w=self.iw)
        x2 = self.proj(self.pool2(x)) if self.downsample else x

        x3 = drop_path(x1, self.drop_path_rate, self.training) + x2
        x4 = rearrange(x3, "b c h w -> b (h w) c")
        x4 = self.ffn(self.norm2(x4))
        x4 = rearrange(x4, "b (h w) c -> b c h w", h=self.ih, w=self.iw)
        return x3 + drop_path(x4, self.drop_path_rate, self.training)


IntPair = Union[int, Sequence[int]]


def _image_size(image_size: IntPair) -> Tuple[int, int]:
    if isinstance(image_size, numbers.Integral) and not isinstance(image_size, bool):
        image_size = (image_size, image_size)
    if (
        not isinstance(image_size, (tuple, list))
        or len(image_size) != 2
        or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in image_size)
    ):
        raise ValueError(f"image_size must be an int or a pair of ints (H, W); got {image_size!r}")
    ih, iw = int(image_size[0]), int(image_size[1])
    if ih <= 0 or iw <= 0 or ih % 32 or iw % 32:
        raise ValueError(
            f"image_size must be positive multiples of 32 (the network downsamples by 32); got ({ih}, {iw})"
        )
    return ih, iw


def _per_stage(name: str, value, count: int) -> Tuple[int, ...]:
    values = (value,) * count if isinstance(value, numbers.Integral) and not isinstance(value, bool) else value
    if (
        not isinstance(values, (tuple, list))
        or len(values) != count
        or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0 for v in values)
    ):
        raise ValueError(f"{name} must be a positive int or {count} positive ints; got {value!r}")
    return tuple(int(v) for v in values)


class CoAtNet(nn.Module):
    """CoAtNet (Dai et al., 2021) as the seed builds it: S0 conv stem, S1..S4 of MBConv ("C") or
    Transformer ("T") blocks, global average pool, linear classifier.

    Args:
        image_size: (H, W), multiples of 32; an int means a square. The model runs at this size.
        in_channels: input channels.
        num_blocks: blocks in S0..S4.
        channels: widths of S0..S4.
        num_classes: classifier outputs.
        block_types: "C" or "T" for S1..S4.
        heads: attention heads, one int for every stage or one per stage S1..S4.
        dim_head: width of one head.
        drop_path_rate: stochastic depth, rising linearly from 0 at the first block of S1 to
            this rate at the last block of S4 (the stem has none). No state dict change.
        backend: "eager", "triton", "ext" or "auto": where the fused ops run.
    """

    def __init__(
        self,
        image_size: IntPair = (224, 224),
        in_channels: int = 3,
        num_blocks: Sequence[int] = (2, 2, 3, 5, 2),
        channels: Sequence[int] = (64, 96, 192, 384, 768),
        num_classes: int = 1000,
        block_types: Sequence[str] = ("C", "C", "T", "T"),
        heads: Union[int, Sequence[int]] = 8,
        dim_head: int = 32,
        drop_path_rate: float = 0.0,
        backend: str = "eager",
    ):
        super().__init__()
        ih, iw = _image_size(image_size)
        num_blocks = _per_stage("num_blocks", num_blocks, 5)
        channels = _per_stage("channels", channels, 5)
        (in_channels,) = _per_stage("in_channels", in_channels, 1)
        (num_classes,) = _per_stage("num_classes", num_classes, 1)
        heads = _per_stage("heads", heads, 4)
        (dim_head,) = _per_stage("dim_head", dim_head, 1)
        if not isinstance(block_types, (tuple, list)) or len(block_types) != 4 or any(t not in ("C", "T") for t in block_types):
            raise ValueError(f"block_types must be 4 entries, each 'C' or 'T'; got {block_types!r}")
        if isinstance(drop_path_rate, bool) or not isinstance(drop_path_rate, numbers.Real) or not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be a number in [0, 1); got {drop_path_rate!r}")
        dispatch.check_backend_name(backend)

        self.image_size = (ih, iw)
        self.in_channels = in_channels
        self.backend = "eager"
        block = {"C": MBConv, "T": Transformer}
        total = sum(num_blocks[1:])
        rates = iter([drop_path_rate * i / max(total - 1, 1) for i in range(total)])

        self.s0 = self._make_layer(conv_3x3_bn, in_channels, channels[0], num_blocks[0], (ih // 2, iw // 2))
        for s in range(1, 5):
            stage = self._make_layer(
                block[block_types[s - 1]], channels[s - 1], channels[s], num_blocks[s],
                (ih // 2 ** (s + 1), iw // 2 ** (s + 1)), rates=rates, heads=heads[s - 1], dim_head=dim_head,
            )
            self.add_module(f"s{s}", stage)

        self.pool = nn.AvgPool2d((ih // 32, iw // 32), 1)
        self.fc = nn.Linear(channels[-1], num_classes, bias=False)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

        set_backend(self, backend)

    def forward(self, x):
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels or tuple(x.shape[2:]) != self.image_size:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"x must have shape [B, {self.in_channels}, {self.image_size[0]}, {self.image_size[1]}] "
                f"(this model's in_channels and image_size); got {got}"
            )
        x = self.s0(x)
        x = self.s1(x)
        x = self.s2(x)
        x = self.s3(x)
        x = self.s4(x)

        x = self.pool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)

    @staticmethod
    def _make_layer(block, in_c, out_c, depth, image_size, rates=None, **kwargs):
        layers = []
        for i in range(depth):
            if rates is not None:
                kwargs["drop_path_rate"] = next(rates)
            if i == 0:
                layers.append(block(in_c, out_c, image_size, downsample=True, **kwargs))
            else:
                layers.append(block(out_c, out_c, image_size, downsample=False, **kwargs))
        return nn.Sequential(*layers)
