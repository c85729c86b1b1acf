"""DDPM++ / NCSN++-style U-Net in Flax linen (the layout of EDM's ``SongUNet``).

``dtype`` is the compute dtype of convolutions, dense layers, attention and activations
(``jnp.bfloat16`` for mixed precision); parameters are always float32, group-norm statistics,
the softmax and the noise embedding are computed in float32.

Input ``x``: (B, H, W, C) float; ``noise_labels``: (B,) float (EDM's c_noise = ln(σ)/4);
optional ``class_labels``: (B,) int in [0, num_classes). Output: (B, H, W, out_channels).
The label embedding is added to the noise embedding before the embedding MLP; CEP adds its
perturbation δ to the label embedding through ``label_embedding_noise`` (B, noise_channels).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

_SKIP_SCALE = math.sqrt(0.5)
_ZERO = nn.initializers.zeros
# EDM's DDPM++ output conv uses xavier-uniform with weight 0.2 (variance 0.04).
_OUT_INIT = nn.initializers.variance_scaling(0.04, "fan_avg", "uniform")
_XAVIER = nn.initializers.xavier_uniform()


def _group_norm(channels: int, dtype: Any = jnp.float32) -> nn.GroupNorm:
    """Group norm (statistics in float32 whatever ``dtype``, the output's dtype)."""
    return nn.GroupNorm(num_groups=min(32, max(channels // 4, 1)), epsilon=1e-6, dtype=dtype)


def _downsample(x: jax.Array) -> jax.Array:
    """2× average pooling (EDM's resample filter [1, 1])."""
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


def _upsample(x: jax.Array) -> jax.Array:
    """2× nearest-neighbour upsampling."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding of a scalar per example (DDPM++); (B,) -> (B, channels)."""

    channels: int
    max_positions: int = 10000

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        half = self.channels // 2
        freqs = jnp.arange(half, dtype=jnp.float32) / max(half - 1, 1)
        freqs = (1.0 / self.max_positions) ** freqs
        x = x.astype(jnp.float32)[:, None] * freqs[None, :]
        return jnp.concatenate([jnp.cos(x), jnp.sin(x)], axis=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features (NCSN++); the frequencies are a fixed, non-trained parameter."""

    channels: int
    scale: float = 16.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = lambda key, shape: jax.random.normal(key, shape) * self.scale
        freqs = jax.lax.stop_gradient(self.param("freqs", init, (self.channels // 2,)))
        x = x.astype(jnp.float32)[:, None] * (2 * jnp.pi * freqs[None, :])
        return jnp.concatenate([jnp.cos(x), jnp.sin(x)], axis=1)


def attention_heads(channels: int, num_heads: int, channels_per_head: int) -> int:
    """Heads of an attention layer over ``channels``: ``num_heads`` when > 0 (EDM's SongUNet,
    i.e. DDPM++ and NCSN++, uses 1), else ``channels // channels_per_head`` (ADM's rule)."""
    heads = num_heads if num_heads > 0 else max(channels // channels_per_head, 1)
    if channels % heads:
        raise ValueError(f"{channels} channels do not split into {heads} attention heads "
                         "(config.model.num_heads / channels_per_head)")
    return heads


class SelfAttention(nn.Module):
    """Multi-head self-attention over the spatial positions, with a residual connection.
    ``num_heads`` > 0 fixes the number of heads; 0 derives it from ``channels_per_head``."""

    channels_per_head: int = 64
    dtype: Any = jnp.float32
    num_heads: int = 0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        heads = attention_heads(c, self.num_heads, self.channels_per_head)
        qkv = nn.Conv(3 * c, (1, 1), kernel_init=_XAVIER, dtype=self.dtype,
                      name="qkv")(_group_norm(c, self.dtype)(x))
        q, k, v = jnp.split(qkv.reshape(b, h * w, 3 * c), 3, axis=-1)
        split = lambda t: t.reshape(b, h * w, heads, c // heads)
        # Softmax in float32, both matmuls in the compute dtype.
        weights = nn.dot_product_attention_weights(split(q), split(k), dtype=self.dtype,
                                                   force_fp32_for_softmax=True)
        a = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(self.dtype), split(v))
        a = a.reshape(b, h, w, c)
        a = nn.Conv(c, (1, 1), kernel_init=_ZERO, dtype=self.dtype, name="proj")(a)
        return (x + a) * _SKIP_SCALE


class UNetBlock(nn.Module):
    """Residual block: GN-SiLU-conv, + embedding, GN-SiLU-dropout-conv, optional resample and
    attention. Residuals are scaled by √0.5 as in DDPM++."""

    out_channels: int
    dropout: float = 0.0
    up: bool = False
    down: bool = False
    attention: bool = False
    channels_per_head: int = 64
    dtype: Any = jnp.float32
    num_heads: int = 0

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array, train: bool) -> jax.Array:
        in_channels = x.shape[-1]
        skip = x
        h = nn.silu(_group_norm(in_channels, self.dtype)(x))
        if self.up:
            h, skip = _upsample(h), _upsample(skip)
        if self.down:
            h, skip = _downsample(h), _downsample(skip)
        conv = lambda ch, k, init, name: nn.Conv(  # noqa: E731
            ch, (k, k), kernel_init=init, dtype=self.dtype, name=name)
        h = conv(self.out_channels, 3, _XAVIER, "conv0")(h)
        h = h + nn.Dense(self.out_channels, kernel_init=_XAVIER, dtype=self.dtype,
                         name="affine")(emb)[:, None, None]
        h = nn.silu(_group_norm(self.out_channels, self.dtype)(h))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = conv(self.out_channels, 3, _ZERO, "conv1")(h)
        if self.out_channels != in_channels or self.up or self.down:
            skip = conv(self.out_channels, 1, _XAVIER, "skip")(skip)
        x = (h + skip.astype(h.dtype)) * _SKIP_SCALE
        if self.attention:
            x = SelfAttention(self.channels_per_head, self.dtype, self.num_heads,
                              name="attn")(x)
        return x


class UNet(nn.Module):
    """EDM ``SongUNet`` layout: encoder of ``num_blocks`` blocks per level (2× down between
    levels), a two-block bottleneck (the first with attention), a decoder of ``num_blocks + 1``
    blocks per level fed with the encoder skips, GN-SiLU-conv output.

    ``channel_mult`` sets the levels (resolution ``image_size / 2**level``); attention runs in
    every block at a resolution listed in ``attn_resolutions``.
    """

    image_size: int
    out_channels: int
    base_channels: int = 128
    channel_mult: Sequence[int] = (2, 2, 2)
    num_blocks: int = 4
    attn_resolutions: Sequence[int] = (16,)
    dropout: float = 0.1
    channels_per_head: int = 64
    num_heads: int = 1  # EDM's SongUNet: one head per attention layer; 0: channels_per_head
    embedding_type: str = "positional"
    emb_mult: int = 4
    num_classes: int = 0
    null_class: bool = False  # one more embedding row (index num_classes): "no label" (CFG)
    dtype: Any = jnp.float32  # compute dtype (bfloat16: mixed precision); parameters float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        noise_labels: jax.Array,
        class_labels: jax.Array | None = None,
        *,
        train: bool = False,
        label_embedding_noise: jax.Array | None = None,
    ) -> jax.Array:
        noise_ch = self.base_channels
        emb = _noise_embedding(self.embedding_type, noise_ch, noise_labels)
        if self.num_classes:
            if class_labels is None:
                raise ValueError("this model is class-conditional (model.num_classes="
                                 f"{self.num_classes}) but no class labels were given")
            # EDM's map_label(one_hot(y) · √num_classes): a Xavier-initialised table scaled by
            # √num_classes, so the label embedding starts (and learns) at the noise
            # embedding's scale instead of ~3× below it.
            table = nn.Embed(self.num_classes + int(self.null_class), noise_ch,
                             embedding_init=_XAVIER, name="map_label")
            label_emb = table(class_labels) * math.sqrt(self.num_classes)
            if label_embedding_noise is not None:
                label_emb = label_emb + label_embedding_noise
            emb = emb + label_emb
        emb = _embedding_mlp(emb, self.base_channels * self.emb_mult, self.dtype)
        block = lambda ch, name, **kw: UNetBlock(  # noqa: E731
            ch, dropout=self.dropout, channels_per_head=self.channels_per_head,
            num_heads=self.num_heads, dtype=self.dtype, name=name, **kw)
        h, skips = _encoder(self, x, emb, train, block)
        channels = h.shape[-1]

        # Decoder.
        for level, mult in reversed(list(enumerate(self.channel_mult))):
            res = self.image_size >> level
            if level == len(self.channel_mult) - 1:
                h = block(channels, f"dec{res}_in0", attention=True)(h, emb, train)
                h = block(channels, f"dec{res}_in1")(h, emb, train)
            else:
                h = block(channels, f"dec{res}_up", up=True)(h, emb, train)
            for i in range(self.num_blocks + 1):
                channels = self.base_channels * mult
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = block(channels, f"dec{res}_block{i}",
                          attention=i == self.num_blocks and res in self.attn_resolutions,
                          )(h, emb, train)
        h = nn.silu(_group_norm(channels, self.dtype)(h))
        return nn.Conv(self.out_channels, (3, 3), kernel_init=_OUT_INIT, dtype=self.dtype,
                       name="out_conv")(h)


def _noise_embedding(embedding_type: str, channels: int, noise_labels: jax.Array) -> jax.Array:
    """The noise-level embedding (B,) -> (B, channels), named ``map_noise`` in the caller."""
    if embedding_type == "positional":
        return PositionalEmbedding(channels, name="map_noise")(noise_labels)
    if embedding_type == "fourier":
        return FourierEmbedding(channels, name="map_noise")(noise_labels)
    raise ValueError(f"model.embedding_type must be 'positional' or 'fourier', "
                     f"got {embedding_type!r}")


def _embedding_mlp(emb: jax.Array, channels: int, dtype: Any = jnp.float32) -> jax.Array:
    """Two SiLU dense layers (``map_layer0/1``) from the summed embeddings."""
    dense = lambda name: nn.Dense(channels, kernel_init=_XAVIER, dtype=dtype, name=name)  # noqa: E731
    return nn.silu(dense("map_layer1")(nn.silu(dense("map_layer0")(emb))))


def _encoder(net, x: jax.Array, emb: jax.Array, train: bool, block
             ) -> tuple[jax.Array, list[jax.Array]]:
    """The U-Net's encoder (called inside ``net``'s compact ``__call__``, so its blocks are
    ``net``'s submodules ``enc<res>_*``): ``num_blocks`` blocks per level, 2× down between
    levels. Returns the last activation and the skips for the decoder."""
    skips = []
    h = x
    channels = net.base_channels
    for level, mult in enumerate(net.channel_mult):
        res = net.image_size >> level
        if level == 0:
            h = nn.Conv(channels, (3, 3), kernel_init=_XAVIER, dtype=getattr(net, "dtype", None),
                        name=f"enc{res}_conv")(h)
        else:
            h = block(channels, f"enc{res}_down", down=True)(h, emb, train)
        skips.append(h)
        for i in range(net.num_blocks):
            channels = net.base_channels * mult
            h = block(channels, f"enc{res}_block{i}",
                      attention=res in net.attn_resolutions)(h, emb, train)
            skips.append(h)
    return h, skips


class NoiseClassifier(nn.Module):
    """Ambient-Omni's noise-conditional classifier (METHODS.md §3.1): the U-Net's encoder (same
    blocks and noise embedding), GN-SiLU, global average pooling and a linear layer.

    ``x``: (B, H, W, C), already scaled by c_in(σ); ``noise_labels``: (B,) c_noise(σ).
    Returns logits (B,) of P(corrupted | x_σ, σ).
    """

    image_size: int
    base_channels: int = 32
    channel_mult: Sequence[int] = (1, 2, 2)
    num_blocks: int = 1
    attn_resolutions: Sequence[int] = ()
    dropout: float = 0.0
    channels_per_head: int = 64
    embedding_type: str = "positional"
    emb_mult: int = 4

    @nn.compact
    def __call__(self, x: jax.Array, noise_labels: jax.Array, *, train: bool = False
                 ) -> jax.Array:
        emb = _noise_embedding(self.embedding_type, self.base_channels, noise_labels)
        emb = _embedding_mlp(emb, self.base_channels * self.emb_mult)
        block = lambda ch, name, **kw: UNetBlock(  # noqa: E731
            ch, dropout=self.dropout, channels_per_head=self.channels_per_head, name=name, **kw)
        h, _ = _encoder(self, x, emb, train, block)
        h = nn.silu(_group_norm(h.shape[-1])(h))
        h = jnp.mean(h, axis=(1, 2))
        return nn.Dense(1, kernel_init=_XAVIER, name="out")(h)[:, 0]


def build_unet(model_config, image_size: int, channels: int) -> UNet:
    """The U-Net described by ``config.model`` for images of (image_size, image_size, channels)."""
    levels = len(model_config.channel_mult)
    if image_size % (2 ** (levels - 1)):
        raise ValueError(
            f"image size {image_size} is not divisible by 2**(levels-1) = {2 ** (levels - 1)} "
            f"for model.channel_mult={tuple(model_config.channel_mult)}")
    return UNet(
        image_size=image_size,
        out_channels=channels,
        base_channels=model_config.base_channels,
        channel_mult=tuple(model_config.channel_mult),
        num_blocks=model_config.num_blocks,
        attn_resolutions=tuple(model_config.attn_resolutions),
        dropout=model_config.dropout,
        channels_per_head=model_config.channels_per_head,
        num_heads=model_config.num_heads,
        embedding_type=model_config.embedding_type,
        emb_mult=model_config.emb_mult,
        num_classes=model_config.num_classes,
        null_class=model_config.num_classes > 0 and model_config.label_dropout > 0,
        dtype=compute_dtype(model_config.compute_dtype),
    )


def compute_dtype(name: str) -> Any:
    """``config.model.compute_dtype`` ('float32' | 'bfloat16') as a jnp dtype."""
    dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
    if name not in dtypes:
        raise ValueError(f"model.compute_dtype must be one of {sorted(dtypes)}, got {name!r}")
    return dtypes[name]
