"""The paper networks (METHODS.md §1) as ``config.model`` settings."""

import ml_collections


def ddpmpp_cifar10() -> ml_collections.ConfigDict:
    """EDM's CIFAR-10 DDPM++ (55.7 M parameters): 128 channels, (2, 2, 2), 4 blocks,
    attention at 16×16 with one head (as EDM's SongUNet), dropout 0.13."""
    return ml_collections.ConfigDict(dict(
        base_channels=128, channel_mult=(2, 2, 2), num_blocks=4, attn_resolutions=(16,),
        dropout=0.13, num_heads=1, channels_per_head=64, embedding_type="positional", emb_mult=4,
        num_classes=0, label_dropout=0.0, compute_dtype="float32"))


def ncsnpp_celeba64() -> ml_collections.ConfigDict:
    """NCSN++ at 64×64: 128 channels, (1, 2, 2, 2), 4 blocks, attention at 16×16 with one head
    (as EDM's SongUNet), dropout 0.05, Fourier noise embedding."""
    return ml_collections.ConfigDict(dict(
        base_channels=128, channel_mult=(1, 2, 2, 2), num_blocks=4, attn_resolutions=(16,),
        dropout=0.05, num_heads=1, channels_per_head=64, embedding_type="fourier", emb_mult=4,
        num_classes=0, label_dropout=0.0, compute_dtype="float32"))
