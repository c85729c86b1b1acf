"""EVALUATION ONLY: the clean images a run's model was trained on, for the memorisation metric.

Each mode knows its own: ``mode=sfbd``, ``online_sfbd`` and ``ambient`` the clean subset of the
prepared data set (the only clean images they see); ``mode=edm`` the clean data set of
``config.data`` (the oracle), with ``data.use_prepared`` the prepared clean group, and with
``data.prepared_group='noisy'`` the clean originals of the corrupted images it trained on
(read from ``eval_only/``, which training code never reads) together with the clean group.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sfbd_jax.data import eval_only, prepare, sources
from sfbd_jax.data.prepared import PreparedDataset


@dataclasses.dataclass(frozen=True)
class TrainingImages:
    """images: (M, H, W, C) float32 in [-1, 1]; name: what they are, for the records."""

    images: np.ndarray
    name: str

    def __len__(self) -> int:
        return int(len(self.images))


def run_training_images(config, workdir: str) -> TrainingImages:
    """The clean images the model of ``config`` (run in ``workdir``) was trained on. The data
    set must have been prepared (the run did it)."""
    if config.mode == "edm" and not config.data.use_prepared:
        data = sources.load_source(config.data)
        return TrainingImages(data.images, f"{data.name} (all clean training images)")
    directory = prepare.with_output_dir(config, workdir).corrupt.output_dir
    clean = PreparedDataset(directory).clean()
    if config.mode == "edm" and config.data.prepared_group == "noisy":
        originals = eval_only.load_clean_originals(directory)
        return TrainingImages(np.concatenate([originals, clean.images]).astype(np.float32),
                              f"{clean.name}+originals of the corrupted images")
    return TrainingImages(clean.images, f"{clean.name} (the clean subset)")
