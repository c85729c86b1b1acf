"""The run's progress line (sfbd_jax/utils/progress.py): phase-relative counts, whole-run
fraction and ETA, rates that leave the compiling first dispatch out, resumed runs, TensorBoard
scalars; and SFBD's plan of its phases."""

import os

import pytest

from sfbd_jax.utils import progress as progress_lib
from sfbd_jax.utils.progress import Phase, RunProgress


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class FakeWriter:
    def __init__(self):
        self.rows = []

    def write_scalars(self, step, scalars):
        self.rows.append((step, dict(scalars)))

    def flush(self):
        pass

    def close(self):
        pass


def sfbd_like_plan(clock, lines, writer=None):
    """Pretrain 1,000 images, then one round: denoise 500 images at 7 evaluations each, train
    1,000 images."""
    return RunProgress([Phase("pretrain", "pretrain", "train", 1000),
                        Phase("round1/backward", "round 1/1 backward", "denoise", 500, 7.0),
                        Phase("round1", "round 1/1 forward", "train", 1000)],
                       writer=writer, every_secs=30.0, clock=clock, log=lines.append)


def test_line_counts_the_phase_and_the_rate_leaves_the_first_dispatch_out():
    clock, lines, writer = FakeClock(), [], FakeWriter()
    p = sfbd_like_plan(clock, lines, writer)
    p.begin("pretrain")
    clock.now += 120.0  # the first dispatch compiles for two minutes
    p.update(100)
    assert lines == []  # only starts the rate clock
    clock.now += 45.0
    p.update(550)  # 450 images in 45 s: 10 images/s
    line = lines[-1]
    assert "pretrain: 550/1,000 images (55%)" in line and "10.0 images/s" in line
    assert "phase ETA 45s" in line
    # The denoising rate is not measured yet: estimated from training (3 evaluations per
    # image at 10 images/s -> 30 evaluations/s -> 4.29 denoised images/s), marked as such.
    expected = 45 + 500 / (10 * 3 / 7) + 1000 / 10
    assert f"ETA ≈{progress_lib.format_duration(expected)}" in line
    fraction = 550 * 3 / (1000 * 3 + 500 * 7 + 1000 * 3)
    assert f"run {100 * fraction:.0f}%" in line
    step, scalars = writer.rows[-1]
    assert step == 550 and scalars["progress/images_per_sec"] == pytest.approx(10.0)
    assert scalars["progress/run_eta_minutes"] == pytest.approx(expected / 60)
    # Not due again until every_secs have passed.
    clock.now += 5.0
    p.update(600)
    assert len(lines) == 1


def test_each_kind_keeps_its_own_rate_and_phases_end_with_their_time():
    clock, lines = FakeClock(), []
    p = sfbd_like_plan(clock, lines)
    p.begin("pretrain")
    p.update(0)
    clock.now += 100.0
    p.update(1000)
    p.end()
    assert lines[-1].endswith("pretrain: done, 1,000 images in 1m40s")
    p.begin("round1/backward")
    clock.now += 3.0  # the sampler compiles during the first batch
    p.update(50)
    clock.now += 10.0
    p.update(250, force=True)  # 200 images in 10 s
    line = lines[-1]
    assert "round 1/1 backward: 250/500 images (50%), 20.0 images/s" in line
    assert "phase ETA 12s" in line
    assert f"ETA {progress_lib.format_duration(12.5 + 1000 / 10)}" in line  # both measured
    assert "≈" not in line


def test_a_resumed_run_counts_the_phases_before_as_done():
    clock, lines = FakeClock(), []
    p = sfbd_like_plan(clock, lines)
    p.begin("round1", done=400)  # resumed mid-forward
    assert p.fraction() == pytest.approx((1000 * 3 + 500 * 7 + 400 * 3) / 9500)
    p.update(400)
    clock.now += 10.0
    p.update(600, force=True)
    assert "round 1/1 forward: 600/1,000 images (60%), 20.0 images/s, phase ETA 20s" in lines[-1]
    assert p.images_done() == 1000 + 500 + 600


def test_unknown_phase_and_duplicate_names_are_refused():
    with pytest.raises(ValueError, match="unique"):
        RunProgress([Phase("a", "a", "train", 1), Phase("a", "a", "train", 1)])
    p = RunProgress([Phase("a", "a", "train", 1)], log=lambda _: None)
    with pytest.raises(KeyError, match="no phase 'b'"):
        p.begin("b")


def test_formats_never_read_zero():
    assert progress_lib.format_rate(0.383) == "0.383"
    assert progress_lib.format_rate(45.61) == "45.6"
    assert progress_lib.format_rate(1234.4) == "1234"
    assert progress_lib.format_duration(59.4) == "59s"
    assert progress_lib.format_duration(725) == "12m05s"
    assert progress_lib.format_duration(3 * 3600 + 7 * 60 + 20) == "3h07m"


def test_sfbd_plan_lists_every_phase_with_its_cost(tmp_path):
    from conftest import tiny_config

    from sfbd_jax.methods import backward, sfbd

    c = tiny_config(image_size=8)
    c.mode = "sfbd"
    c.sfbd.pretrain_images, c.sfbd.images_per_round, c.sfbd.rounds = 32, 16, 2
    c.eval.round_num_samples = 8
    plan = sfbd.SFBDRun(c, str(tmp_path)).plan(num_noisy=40, sigma_zeta=0.2)
    names = [p.name for p in plan.phases]
    assert names == ["pretrain", "round0/metrics", "round1/backward", "round1",
                     "round1/metrics", "round2/backward", "round2", "round2/metrics"]
    by_name = {p.name: p for p in plan.phases}
    assert by_name["pretrain"].total == 32 and by_name["round2"].total == 16
    assert by_name["round1/backward"].total == 40
    assert by_name["round1/backward"].cost == backward.cost_per_image(c, 0.2)[0]
    assert by_name["round1/metrics"].total == 8 and by_name["round1/metrics"].kind == "sample"


def test_tensorboard_writer_goes_to_its_own_directory(tmp_path):
    writer = progress_lib.tensorboard_writer(str(tmp_path))
    p = RunProgress([Phase("a", "a", "train", 10)], writer=writer, log=lambda _: None)
    p.begin("a")
    p.update(1)
    p.update(5, force=True)
    p.close()
    assert any(name.startswith("events.out.tfevents")
               for name in os.listdir(tmp_path / "progress"))


def test_evaluation_summary_fits_a_screen_and_names_what_each_metric_says():
    from sfbd_jax.evaluation import report

    result = {"classifier_fd": 3.8987, "swd": 0.0833, "precision": 0.788, "recall": 0.808,
              "memorised_fraction_train_pixel": 0.0, "confident_fraction": 0.93,
              "num_samples": 1000, "reference_count": 5000, "train_count": 50,
              "neighbour_features": "classifier", "most_copied_train": {"d1": 1.0}}
    text = report.summary_text(result, "Evaluation of runs/demo:")
    lines = text.splitlines()
    assert lines[0] == "Evaluation of runs/demo:"
    assert any("classifier FD" in ln and "3.899" in ln and "lower is better" in ln
               for ln in lines)
    assert any("recall" in ln and "0.808" in ln and "diversity" in ln for ln in lines)
    assert "fid" not in text.lower().split("fréchet")[0]  # absent metrics are not shown
    assert lines[-1] == "  (1,000 samples, 5,000 reference images, 50 training images)"


def test_the_first_line_of_a_phase_waits_for_a_real_rate():
    """Steps are dispatched asynchronously: two updates a few milliseconds apart must not make
    the line."""
    clock, lines = FakeClock(), []
    p = sfbd_like_plan(clock, lines)
    p.begin("round1", done=0)
    p.update(64)
    clock.now += 0.005
    p.update(128)
    assert lines == []
    clock.now += 30.0
    p.update(700)
    assert len(lines) == 1 and "21.2 images/s" in lines[0]  # (700 - 64) / 30.005 s
