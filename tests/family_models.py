"""Small models with the module structure of torchvision and timm families (no torchvision or timm needed).

Each mimics the names, nesting and forward quirks that site discovery and BN twins meet in the real ones:
timm's activation-fused `BatchNormAct2d`, timm EfficientNet (`conv_stem, bn1, blocks, conv_head, bn2`), timm and
torchvision ConvNeXt (channels-last LayerNorm/Linear inside each block), torchvision's features-style models (one
`features` Sequential holding stem, stages and the last conv), a timm-style ViT (tokens, attention internals), a
torchvision-style ViT on 28x28 grayscale (nn.MultiheadAttention, `encoder.layers.encoder_layer_k`) and a Hugging Face
one (layers in a ModuleList, returning tuples; dict outputs).
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


class BatchNormAct2d(nn.BatchNorm2d):
    """timm.layers.BatchNormAct2d: BatchNorm2d, then `drop`, then `act` (timm's default act_layer is ReLU)."""

    def __init__(self, num_features: int, act_layer=nn.ReLU, drop_layer=None, **kw) -> None:
        super().__init__(num_features, **kw)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = act_layer(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        factor = 0.0 if self.momentum is None else self.momentum
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training, factor,
                         self.eps)
        return self.act(self.drop(x))


def _randomise_bns(net: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine parameters (a fresh BN would hide a twin built wrongly)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
    return net.eval()


# ---------------------------------------------------------------- timm EfficientNet


class DepthwiseSeparable(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False)
        self.bn1 = BatchNormAct2d(c_in, act_layer=nn.SiLU)
        self.conv_pw = nn.Conv2d(c_in, c_out, 1, bias=False)
        self.bn2 = BatchNormAct2d(c_out, act_layer=nn.Identity)
        self.has_skip = stride == 1 and c_in == c_out

    def forward(self, x):
        y = self.bn2(self.conv_pw(self.bn1(self.conv_dw(x))))
        return y + x if self.has_skip else y


class EfficientNetLike(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        w = width
        self.conv_stem = nn.Conv2d(3, w, 3, 2, 1, bias=False)
        self.bn1 = BatchNormAct2d(w, act_layer=nn.SiLU)
        chans = [w, 2 * w, 3 * w, 4 * w]
        self.blocks = nn.Sequential(*[
            nn.Sequential(DepthwiseSeparable(c_in, c_out, 2 if i else 1), DepthwiseSeparable(c_out, c_out))
            for i, (c_in, c_out) in enumerate(zip([w, *chans[:-1]], chans))])
        self.conv_head = nn.Conv2d(chans[-1], 8 * w, 1, bias=False)
        self.bn2 = BatchNormAct2d(8 * w, act_layer=nn.SiLU)
        self.global_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.classifier = nn.Linear(8 * w, num_classes)

    def forward(self, x):
        x = self.bn1(self.conv_stem(x))
        x = self.blocks(x)
        x = self.bn2(self.conv_head(x))
        return self.classifier(self.global_pool(x))


def efficientnet_like(num_classes: int = 10) -> EfficientNetLike:
    torch.manual_seed(0)
    return _randomise_bns(EfficientNetLike(num_classes))


# ---------------------------------------------------------------- ConvNeXt (timm and torchvision)


class LayerNorm2d(nn.LayerNorm):
    """timm/torchvision LayerNorm2d: a LayerNorm over the channels of an NCHW map."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(0.0)
        self.norm = nn.Identity()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(0.0)

    def forward(self, x):
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class ConvNeXtBlock(nn.Module):
    """timm's block: depthwise conv, then permute to NHWC (functional), LayerNorm and Mlp, permute back."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)
        self.gamma = nn.Parameter(torch.full((dim,), 0.5))
        self.shortcut = nn.Identity()
        self.drop_path = nn.Identity()

    def forward(self, x):
        shortcut = x
        x = self.conv_dw(x).permute(0, 2, 3, 1)
        x = self.mlp(self.norm(x))
        x = x.permute(0, 3, 1, 2).mul(self.gamma.reshape(1, -1, 1, 1))
        return self.drop_path(x) + self.shortcut(shortcut)


class ConvNeXtStage(nn.Module):
    def __init__(self, c_in: int, c_out: int, depth: int) -> None:
        super().__init__()
        self.downsample = (nn.Sequential(LayerNorm2d(c_in), nn.Conv2d(c_in, c_out, 2, 2)) if c_in != c_out
                           else nn.Identity())
        self.blocks = nn.Sequential(*[ConvNeXtBlock(c_out) for _ in range(depth)])

    def forward(self, x):
        return self.blocks(self.downsample(x))


class ConvNeXtLike(nn.Module):
    """timm convnext_atto's layout: stem, stages, norm_pre, head."""

    def __init__(self, num_classes: int = 10, dims=(8, 16, 24, 32), depths=(1, 1, 2, 1)) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 2, 2), LayerNorm2d(dims[0]))
        self.stages = nn.Sequential(*[ConvNeXtStage(dims[max(0, i - 1)], d, n)
                                      for i, (d, n) in enumerate(zip(dims, depths))])
        self.norm_pre = nn.Identity()
        self.head = nn.ModuleDict({"global_pool": nn.AdaptiveAvgPool2d(1), "norm": LayerNorm2d(dims[-1]),
                                   "flatten": nn.Flatten(1), "fc": nn.Linear(dims[-1], num_classes)})

    def forward(self, x):
        x = self.norm_pre(self.stages(self.stem(x)))
        h = self.head
        return h["fc"](h["flatten"](h["norm"](h["global_pool"](x))))


def convnext_like(num_classes: int = 10) -> ConvNeXtLike:
    torch.manual_seed(0)
    return ConvNeXtLike(num_classes).eval()


class Permute(nn.Module):
    """torchvision.ops.misc.Permute."""

    def __init__(self, dims: list[int]) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return torch.permute(x, self.dims)


class CNBlock(nn.Module):
    """torchvision's ConvNeXt block: the NHWC part is a Sequential of modules (Permute, LayerNorm, Linear, ...)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(dim, dim, 7, padding=3, groups=dim), Permute([0, 2, 3, 1]),
                                   nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim),
                                   Permute([0, 3, 1, 2]))
        self.layer_scale = nn.Parameter(torch.full((dim, 1, 1), 0.5))
        self.stochastic_depth = nn.Identity()

    def forward(self, x):
        return self.stochastic_depth(self.layer_scale * self.block(x)) + x


class TVConvNeXtLike(nn.Module):
    """torchvision convnext_tiny's layout: features = [stem, stage, downsample, stage, ...], avgpool, classifier."""

    def __init__(self, num_classes: int = 10, dims=(8, 16, 24), depths=(1, 2, 1)) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Sequential(nn.Conv2d(3, dims[0], 2, 2), LayerNorm2d(dims[0]))]
        for i, (d, n) in enumerate(zip(dims, depths)):
            layers.append(nn.Sequential(*[CNBlock(d) for _ in range(n)]))
            if i + 1 < len(dims):
                layers.append(nn.Sequential(LayerNorm2d(d), nn.Conv2d(d, dims[i + 1], 2, 2)))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(LayerNorm2d(dims[-1]), nn.Flatten(1), nn.Linear(dims[-1], num_classes))

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)))


def tv_convnext_like(num_classes: int = 10) -> TVConvNeXtLike:
    torch.manual_seed(0)
    return TVConvNeXtLike(num_classes).eval()


# ---------------------------------------------------------------- torchvision features-style (MobileNetV3-small)


class Conv2dNormActivation(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, k: int = 3, stride: int = 1, groups: int = 1, act=nn.Hardswish):
        layers = [nn.Conv2d(c_in, c_out, k, stride, (k - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out)]
        if act is not None:
            layers.append(act(inplace=True))
        super().__init__(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, exp: int, c_out: int, k: int, stride: int, act=nn.ReLU) -> None:
        super().__init__()
        layers = [] if exp == c_in else [Conv2dNormActivation(c_in, exp, 1, act=act)]
        layers += [Conv2dNormActivation(exp, exp, k, stride, groups=exp, act=act),
                   Conv2dNormActivation(exp, c_out, 1, act=None)]
        self.block = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and c_in == c_out

    def forward(self, x):
        y = self.block(x)
        return y + x if self.use_res_connect else y


# torchvision mobilenet_v3_small's inverted-residual settings: (in, kernel, expanded, out, activation, stride)
MOBILENET_V3_SMALL = [(16, 3, 16, 16, nn.ReLU, 2), (16, 3, 72, 24, nn.ReLU, 2), (24, 3, 88, 24, nn.ReLU, 1),
                      (24, 5, 96, 40, nn.Hardswish, 2), (40, 5, 240, 40, nn.Hardswish, 1),
                      (40, 5, 240, 40, nn.Hardswish, 1), (40, 5, 120, 48, nn.Hardswish, 1),
                      (48, 5, 144, 48, nn.Hardswish, 1), (48, 5, 288, 96, nn.Hardswish, 2),
                      (96, 5, 576, 96, nn.Hardswish, 1), (96, 5, 576, 96, nn.Hardswish, 1)]


class MobileNetLike(nn.Module):
    """torchvision mobilenet_v3_small's layout and widths (without squeeze-excitation): features = [stem, 11
    inverted residuals, last conv to 576 channels], avgpool, classifier (576 -> 1024 -> classes): ~1.5M parameters."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = [Conv2dNormActivation(3, 16, 3, 2)]
        layers += [InvertedResidual(c_in, exp, c_out, k, s, act) for c_in, k, exp, c_out, act, s in MOBILENET_V3_SMALL]
        layers.append(Conv2dNormActivation(96, 576, 1))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(576, 1024), nn.Hardswish(inplace=True), nn.Dropout(0.2),
                                        nn.Linear(1024, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def mobilenet_like(num_classes: int = 10) -> MobileNetLike:
    torch.manual_seed(0)
    return _randomise_bns(MobileNetLike(num_classes))


# ---------------------------------------------------------------- timm ViT


class Attention(nn.Module):
    """timm's Attention: q, k, v are (batch, heads, tokens, head_dim) tensors; q_norm/k_norm act on them."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.Identity()
        self.k_norm = nn.Identity()
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        attn = self.attn_drop((q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5).softmax(-1))
        return self.proj_drop(self.proj((attn @ v).transpose(1, 2).reshape(b, n, c)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.ls1 = nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 2 * dim)
        self.ls2 = nn.Identity()

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, dim: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, patch)
        self.norm = nn.Identity()

    def forward(self, x):
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class ViTLike(nn.Module):
    """timm vit_tiny's layout, tiny: patch_embed, cls token, blocks of (norm1, attn, norm2, mlp), norm, head."""

    def __init__(self, num_classes: int = 10, dim: int = 12, heads: int = 3, depth: int = 6, patch: int = 8) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(dim, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1)
        return self.head(self.norm(self.blocks(x))[:, 0])


def vit_like(num_classes: int = 10) -> ViTLike:
    torch.manual_seed(0)
    return ViTLike(num_classes).eval()


# ---------------------------------------------------------------- torchvision ViT, on 28x28 grayscale


class MLPBlock(nn.Sequential):
    """torchvision.models.vision_transformer.MLPBlock: Linear, GELU, Dropout, Linear, Dropout."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.0), nn.Linear(hidden, dim), nn.Dropout(0.0))


class EncoderBlock(nn.Module):
    """torchvision's pre-norm encoder block: ln_1, self_attention (nn.MultiheadAttention), dropout, ln_2, mlp."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(dim, heads, dropout=0.0, batch_first=True)
        self.dropout = nn.Dropout(0.0)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, hidden)

    def forward(self, x):
        y = self.ln_1(x)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        x = self.dropout(y) + x
        return x + self.mlp(self.ln_2(x))


class Encoder(nn.Module):
    def __init__(self, tokens: int, dim: int, heads: int, hidden: int, depth: int) -> None:
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.dropout = nn.Dropout(0.0)
        self.layers = nn.Sequential(OrderedDict((f"encoder_layer_{i}", EncoderBlock(dim, heads, hidden))
                                                for i in range(depth)))
        self.ln = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x):
        return self.ln(self.layers(self.dropout(x + self.pos_embedding)))


class TVViTLike(nn.Module):
    """torchvision vit_b_16's layout, tiny, for 28x28 grayscale: conv_proj (7x7 patches: 16 tokens), class token,
    encoder (pos_embedding, dropout, layers.encoder_layer_k, ln), heads.head."""

    def __init__(self, num_classes: int = 10, channels: int = 1, size: int = 28, patch: int = 7, dim: int = 16,
                 heads: int = 2, depth: int = 4) -> None:
        super().__init__()
        self.conv_proj = nn.Conv2d(channels, dim, patch, patch)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.encoder = Encoder((size // patch) ** 2 + 1, dim, heads, 2 * dim, depth)
        self.heads = nn.Sequential(OrderedDict(head=nn.Linear(dim, num_classes)))

    def forward(self, x):
        x = self.conv_proj(x)
        n, d = x.shape[:2]
        x = x.reshape(n, d, -1).permute(0, 2, 1)
        x = torch.cat([self.class_token.expand(n, -1, -1), x], 1)
        return self.heads(self.encoder(x)[:, 0])


def _randomise_layernorms(net: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial LayerNorm scales and shifts (a fresh LayerNorm would hide a twin built wrongly)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
    return net.eval()


def tv_vit_like(num_classes: int = 10) -> TVViTLike:
    torch.manual_seed(0)
    net = TVViTLike(num_classes)
    with torch.no_grad():
        net.class_token.normal_(0, 0.5)
    return _randomise_layernorms(net)


# ---------------------------------------------------------------- Hugging Face ViT (transformers' ViTForImageClassification)


class HFSelfAttention(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.dropout = nn.Dropout(0.0)

    def forward(self, x):
        q, k, v = self.query(x), self.key(x), self.value(x)
        return (self.dropout((q @ k.transpose(1, 2) * x.shape[-1] ** -0.5).softmax(-1)) @ v,)


class HFDenseOut(nn.Module):
    """ViTSelfOutput (residual=False) and ViTOutput (residual=True: dense, dropout, + the block's input)."""

    def __init__(self, d_in: int, d_out: int, residual: bool) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.dropout = nn.Dropout(0.0)
        self.residual = residual

    def forward(self, x, inp):
        y = self.dropout(self.dense(x))
        return y + inp if self.residual else y


class HFAttention(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.attention = HFSelfAttention(dim)
        self.output = HFDenseOut(dim, dim, residual=False)

    def forward(self, x):
        return (self.output(self.attention(x)[0], x),)


class HFIntermediate(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, hidden)
        self.intermediate_act_fn = nn.GELU()

    def forward(self, x):
        return self.intermediate_act_fn(self.dense(x))


class HFLayer(nn.Module):
    """transformers' ViTLayer: defines its norms last but calls them first, and returns a tuple."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.attention = HFAttention(dim)
        self.intermediate = HFIntermediate(dim, 2 * dim)
        self.output = HFDenseOut(2 * dim, dim, residual=True)
        self.layernorm_before = nn.LayerNorm(dim)
        self.layernorm_after = nn.LayerNorm(dim)

    def forward(self, h):
        h = self.attention(self.layernorm_before(h))[0] + h
        return (self.output(self.intermediate(self.layernorm_after(h)), h),)


class HFEncoder(nn.Module):
    def __init__(self, dim: int, depth: int) -> None:
        super().__init__()
        self.layer = nn.ModuleList([HFLayer(dim) for _ in range(depth)])  # never called itself

    def forward(self, h):
        for layer in self.layer:
            h = layer(h)[0]
        return {"last_hidden_state": h}


class HFPatchEmbeddings(nn.Module):
    def __init__(self, dim: int, patch: int) -> None:
        super().__init__()
        self.projection = nn.Conv2d(1, dim, patch, patch)

    def forward(self, x):
        return self.projection(x).flatten(2).transpose(1, 2)


class HFEmbeddings(nn.Module):
    def __init__(self, dim: int, patch: int, tokens: int) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.5)
        self.position_embeddings = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.patch_embeddings = HFPatchEmbeddings(dim, patch)
        self.dropout = nn.Dropout(0.0)

    def forward(self, x):
        e = self.patch_embeddings(x)
        return self.dropout(torch.cat([self.cls_token.expand(len(e), -1, -1), e], 1) + self.position_embeddings)


class HFViTModel(nn.Module):
    def __init__(self, dim: int, patch: int, depth: int, size: int) -> None:
        super().__init__()
        self.embeddings = HFEmbeddings(dim, patch, (size // patch) ** 2 + 1)
        self.encoder = HFEncoder(dim, depth)
        self.layernorm = nn.LayerNorm(dim)

    def forward(self, x):
        return {"last_hidden_state": self.layernorm(self.encoder(self.embeddings(x))["last_hidden_state"])}


class HFViTLike(nn.Module):
    """transformers' ViTForImageClassification layout, tiny, for 28x28 grayscale: vit (embeddings, encoder.layer[k]
    returning tuples, layernorm, outputs as dicts), classifier."""

    def __init__(self, num_classes: int = 10, dim: int = 16, patch: int = 7, depth: int = 6, size: int = 28) -> None:
        super().__init__()
        self.vit = HFViTModel(dim, patch, depth, size)
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, x):
        return self.classifier(self.vit(x)["last_hidden_state"][:, 0])


def hf_vit_like(num_classes: int = 10) -> HFViTLike:
    torch.manual_seed(0)
    return _randomise_layernorms(HFViTLike(num_classes))


# ---------------------------------------------------------------- research code


class FeaturesAndLogits(nn.Module):
    """Returns (features, logits), as many research codebases do: element 0 is a 16-d feature vector of a 3-class
    model on 1-channel images."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 16, 3, padding=1)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        f = torch.relu(self.conv(x)).mean((2, 3))
        return f, self.fc(f)


def features_and_logits() -> FeaturesAndLogits:
    torch.manual_seed(0)
    return FeaturesAndLogits().eval()


FAMILIES = {"efficientnet": efficientnet_like, "convnext": convnext_like, "tv_convnext": tv_convnext_like,
            "mobilenet": mobilenet_like, "vit": vit_like, "tv_vit": tv_vit_like, "hf_vit": hf_vit_like}
INPUT_SHAPES = {"tv_vit": (1, 28, 28), "hf_vit": (1, 28, 28)}  # C,H,W where a family does not take 3x32x32
