"""A one-screen summary of an evaluation result (``evaluator.Evaluator.evaluate_model``'s dict):
each metric present, its value and what it says, for the terminal after
``python -m sfbd_jax.evaluate``. The full result stays in ``DIR/eval/<tag>.json``."""

from __future__ import annotations

# (key, label, what it says). Only the keys present in a result are shown, in this order.
_ROWS = (
    ("fid", "FID", "Fréchet distance in Inception features (lower is better)"),
    ("kid", "KID", "kernel Inception distance (lower is better)"),
    ("classifier_fd", "classifier FD",
     "Fréchet distance in the feature classifier's features (lower is better)"),
    ("swd", "SWD", "sliced Wasserstein distance in pixels (lower is better)"),
    ("noise_sigma", "residual noise",
     "wavelet estimate of the pixel-noise σ left in the samples (real data: ~0; lower is "
     "better)"),
    ("confident_fraction", "recognised",
     "share of samples the classifier labels with probability >= 0.9 (higher is better)"),
    ("precision", "precision", "share of samples near real images (fidelity; higher is better)"),
    ("recall", "recall", "share of real images near samples (diversity; higher is better)"),
    ("density", "density", "like precision, counting how many real neighbourhoods hold a sample"),
    ("coverage", "coverage", "share of real images with a sample in their neighbourhood"),
    ("memorised_fraction_train_pixel", "memorised (pixels)",
     "share of samples with d1/d2 below the threshold to a training image (copies)"),
    ("memorised_fraction_train_features", "memorised (features)",
     "the same in the classifier's features"),
    ("d1_ratio_train_pixel", "d1 ratio (pixels)",
     "samples' nearest-training-image distance over held-out images' (< 1: closer than "
     "new data, i.e. copying)"),
)


def summary_text(result: dict, title: str) -> str:
    """The metrics of ``result`` present in the table above, one per line, under ``title``."""
    lines = [title]
    shown = [(label, result[key], meaning) for key, label, meaning in _ROWS
             if isinstance(result.get(key), (int, float))]
    width = max((len(label) for label, _, _ in shown), default=0)
    for label, value, meaning in shown:
        lines.append(f"  {label:<{width}}  {value:>9.4g}  {meaning}")
    facts = [f"{result[k]:,} {name}" for k, name in (
        ("num_samples", "samples"), ("reference_count", "reference images"),
        ("train_count", "training images")) if isinstance(result.get(k), int)]
    if facts:
        lines.append("  (" + ", ".join(facts) + ")")
    return "\n".join(lines)
