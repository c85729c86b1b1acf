"""The once-corrupted data set: determinism, counts, manifest, refusal to overwrite, checksums."""

import ast
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import tiny_config

from sfbd_jax.data import eval_only, prepare, sources
from sfbd_jax.data.prepared import PreparedDataset
from sfbd_jax.data.shards import CorruptShardError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mnist_prepare_config(out, **corrupt):
    c = tiny_config(image_size=28)
    c.corrupt.output_dir = str(out)
    c.corrupt.shard_size = 1500
    for k, v in corrupt.items():
        c.corrupt[k] = v
    return c


def checksums(manifest):
    return {e["file"]: e["sha256"] for group in manifest["shards"].values()
            for entries in group.values() for e in entries}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("prep") / "mnist_noisy"
    return out, prepare.prepare(mnist_prepare_config(out))


def test_counts_indices_and_noise(prepared):
    out, manifest = prepared
    assert manifest["counts"] == {"source": 5000, "clean": 50, "noisy": 4950}
    assert [e["rows"] for e in manifest["shards"]["noisy"]["images"]] == [1500] * 3 + [450]
    data = PreparedDataset(str(out))
    clean = data.clean()
    noisy, noisy_idx = data.noisy()
    assert len(clean) == 50 and len(noisy) == 4950
    clean_idx = np.concatenate([np.load(os.path.join(out, e["file"]))
                                for e in manifest["shards"]["clean"]["indices"]])
    np.testing.assert_array_equal(np.sort(np.concatenate([clean_idx, noisy_idx])),
                                  np.arange(5000))
    source = sources.load_source(tiny_config(image_size=28).data)
    np.testing.assert_array_equal(clean.images, source.images[clean_idx])
    np.testing.assert_array_equal(clean.labels, source.labels[clean_idx])
    originals = eval_only.load_clean_originals(str(out))
    np.testing.assert_array_equal(originals, source.images[noisy_idx])
    noise = noisy.images - originals
    assert noise.std() == pytest.approx(0.2, rel=0.01)
    assert noisy.images.max() > 1.0 and noisy.images.min() < -1.0  # stored unclipped


def test_same_settings_same_bytes_and_no_op(prepared, tmp_path):
    out, manifest = prepared
    other = prepare.prepare(mnist_prepare_config(tmp_path / "again"))
    assert checksums(other) == checksums(manifest)
    mtime = os.path.getmtime(out / "manifest.json")
    assert prepare.prepare(mnist_prepare_config(out)) == manifest  # a no-op
    assert os.path.getmtime(out / "manifest.json") == mtime


def test_noise_does_not_depend_on_the_shard_size(prepared, tmp_path):
    _, manifest = prepared
    out = tmp_path / "shard700"
    prepare.prepare(mnist_prepare_config(out, shard_size=700))
    a, _ = PreparedDataset(str(out)).noisy()
    b, _ = PreparedDataset(str(prepared[0])).noisy()
    np.testing.assert_array_equal(a.images, b.images)


def test_other_seeds_give_other_data(prepared, tmp_path):
    _, manifest = prepared
    noise2 = prepare.prepare(mnist_prepare_config(tmp_path / "n2", noise_seed=2))
    split2 = prepare.prepare(mnist_prepare_config(tmp_path / "s2", split_seed=5))
    first = manifest["shards"]["noisy"]["images"][0]["sha256"]
    assert noise2["shards"]["noisy"]["images"][0]["sha256"] != first
    assert (split2["shards"]["clean"]["indices"][0]["sha256"]
            != manifest["shards"]["clean"]["indices"][0]["sha256"])


def test_refuses_to_overwrite_other_settings(prepared):
    out, _ = prepared
    with pytest.raises(FileExistsError, match=r"refusing to overwrite.*corruption.sigma: 0.2"):
        prepare.prepare(mnist_prepare_config(out, sigma=0.5))


def test_corrupt_or_truncated_shard_is_named(prepared, tmp_path):
    out, _ = prepared
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(out, broken)
    shard = broken / "noisy" / "images-00002.npy"
    with open(shard, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(CorruptShardError, match="noisy/images-00002.npy"):
        PreparedDataset(str(broken)).noisy()
    PreparedDataset(str(broken)).clean()  # other shards still read
    # Memory-mapped, as training reads it: on opening, with or without the checksums (the
    # other hosts check the .npy header and row count only); nothing is deleted.
    from sfbd_jax.data import shards

    entries = prepare.read_manifest(str(broken))["shards"]["noisy"]["images"]
    for verify in (True, False):
        with pytest.raises(CorruptShardError, match="noisy/images-00002.npy"):
            shards.ShardedArray(str(broken), entries, verify=verify)
    assert os.path.getsize(shard) == 1000


def test_nan_in_a_shard_with_an_updated_checksum_is_named_with_its_rows(prepared, tmp_path):
    """A shard can be valid by its checksum and still hold NaN/Inf: caught when the set is opened
    (eagerly, or by the verifying process of a lazy set) and by the first batch that reads the
    rows (a lazy set opened without verification, as on the other hosts)."""
    import hashlib
    import shutil

    from sfbd_jax.data import shards

    out, _ = prepared
    broken = tmp_path / "nan"
    shutil.copytree(out, broken)
    shard = broken / "noisy" / "images-00001.npy"
    values = np.load(shard)
    values[[3, 17], 5, 5, 0] = [np.nan, np.inf]
    np.save(shard, values)
    manifest = json.loads((broken / prepare.MANIFEST).read_text())
    for entry in manifest["shards"]["noisy"]["images"]:
        if entry["file"] == "noisy/images-00001.npy":
            entry["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
    (broken / prepare.MANIFEST).write_text(json.dumps(manifest))
    message = r"noisy/images-00001.npy holds NaN or infinite values in 2 row\(s\): 3, 17"
    with pytest.raises(CorruptShardError, match=message):
        PreparedDataset(str(broken)).noisy()
    with pytest.raises(CorruptShardError, match=message):
        PreparedDataset(str(broken), lazy=True).noisy()  # process 0 verifies on opening
    unverified = shards.ShardedArray(str(broken), manifest["shards"]["noisy"]["images"],
                                     verify=False)
    unverified[np.arange(0, 1500)]  # rows of the first shard are fine
    with pytest.raises(CorruptShardError, match=r"images-00001.npy .* 1 row\(s\): 17"):
        unverified[np.array([1500 + 17, 2])]


def test_fraction_float16_and_blur(tmp_path):
    c = mnist_prepare_config(tmp_path / "f16", clean_count=0, clean_fraction=0.04,
                             dtype="float16", shard_size=5000)
    m = prepare.prepare(c)
    assert m["counts"]["clean"] == 200
    assert 0 < m["storage_rounding"]["rms"] < 1e-3
    assert m["storage_rounding"]["max_abs"] < 2e-3
    assert np.load(glob.glob(str(tmp_path / "f16" / "noisy" / "images-*.npy"))[0]).dtype \
        == np.float16
    b = prepare.prepare(mnist_prepare_config(tmp_path / "blur", type="gaussian_blur",
                                             sigma_px=1.0, clean_count=4900))
    assert b["settings"]["corruption"] == {"type": "gaussian_blur", "sigma_px": 1.0}
    noisy, _ = PreparedDataset(str(tmp_path / "blur")).noisy()
    originals = eval_only.load_clean_originals(str(tmp_path / "blur"))
    # Blur smooths: the energy of neighbour differences (a high-pass filter) drops.
    assert np.mean(np.diff(noisy.images, axis=2) ** 2) < 0.6 * np.mean(
        np.diff(originals, axis=2) ** 2)


def test_training_code_never_imports_the_eval_only_originals():
    for path in glob.glob(os.path.join(REPO, "sfbd_jax", "training", "*.py")) + [
            os.path.join(REPO, "sfbd_jax", "data", "prepared.py"),
            os.path.join(REPO, "sfbd_jax", "data", "pipeline.py")]:
        tree = ast.parse(open(path).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom | ast.Import):
                names = [a.name for a in node.names] + [getattr(node, "module", "") or ""]
                assert not any("eval_only" in n for n in names), path


def test_command_line(tmp_path):
    out = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, "-m", "sfbd_jax.data.prepare", "--config", "configs/mnist_edm.py",
         f"--config.corrupt.output_dir={out}", "--config.corrupt.clean_count=4990"],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(out / "manifest.json") as f:
        assert json.load(f)["counts"] == {"source": 5000, "clean": 4990, "noisy": 10}


def test_lazy_reading_gathers_only_asked_rows(prepared):
    out, _ = prepared
    eager, _ = PreparedDataset(str(out)).noisy()
    lazy, _ = PreparedDataset(str(out), lazy=True).noisy()
    assert lazy.images.shape == eager.images.shape
    idx = np.array([[4949, 0, 1500], [1499, 3000, 7]])  # across shard boundaries
    np.testing.assert_array_equal(lazy.images[idx], eager.images[idx])
    with pytest.raises(IndexError):
        lazy.images[np.array([4950])]


def test_lazy_batches_match_eager_batches(prepared, two_devices):
    from sfbd_jax.data import pipeline
    from sfbd_jax.utils import devices

    out, _ = prepared
    mesh = devices.make_data_mesh(2)
    got = []
    for lazy in (False, True):
        clean = PreparedDataset(str(out), lazy=lazy).clean()
        got.append(np.asarray(pipeline.TrainBatches(clean, 8, 2, 0, mesh, 10).get(3)["image"]))
    np.testing.assert_array_equal(got[0], got[1])


def test_storage_in_the_dtype_each_kind_needs(prepared):
    """Clean images and originals as uint8 pixels (exact), noisy values as float16 within the
    bound the manifest records, labels int32; everything read back as float32."""
    import jax

    from sfbd_jax import corruptions

    out, manifest = prepared
    assert manifest["format_version"] == 2
    assert manifest["storage"] == {"clean": "uint8", "noisy": "float16", "eval_only": "uint8"}
    dtypes = {g: {name: np.load(os.path.join(out, entries[0]["file"])).dtype
                  for name, entries in manifest["shards"][g].items()}
              for g in ("clean", "noisy", "eval_only")}
    assert dtypes["clean"]["images"] == dtypes["eval_only"]["originals"] == np.uint8
    assert dtypes["noisy"]["images"] == np.float16
    assert dtypes["clean"]["labels"] == dtypes["noisy"]["labels"] == np.int32
    source = sources.load_source(tiny_config(image_size=28).data)
    for lazy in (False, True):
        data = PreparedDataset(str(out), lazy=lazy)
        noisy, index = data.noisy()
        clean = data.clean()
        read = (lambda x: x.all_rows()) if lazy else (lambda x: x)
        # uint8 → float32 is exact: the very values of the source.
        originals = eval_only.load_clean_originals(str(out), lazy=lazy)
        np.testing.assert_array_equal(read(originals), source.images[index])
        assert read(clean.images).dtype == np.float32
        exact = corruptions.apply_corruption(
            source.images[index], manifest["settings"]["corruption"],
            jax.random.PRNGKey(manifest["settings"]["noise_seed"]), index)
        error = np.abs(read(noisy.images) - exact)
        assert 0 < error.max() <= manifest["storage_rounding"]["max_abs"] < 2e-3
        rms = float(np.sqrt(np.mean(error.astype(np.float64) ** 2)))
        assert rms == pytest.approx(manifest["storage_rounding"]["rms"], rel=1e-3)
    # Disk: 784 B per clean image (was 3,136 as float32), 1,568 B per noisy one (was 3,136).
    sizes = {g: os.path.getsize(os.path.join(out, manifest["shards"][g]["images"][0]["file"]))
             / manifest["shards"][g]["images"][0]["rows"] for g in ("clean", "noisy")}
    assert 784 <= sizes["clean"] < 790 and 1568 <= sizes["noisy"] < 1572


def _as_format_1(src, dst):
    """A copy of prepared set ``src`` as the project wrote it before compact storage: every
    image shard float32, no storage record, format 1."""
    import shutil

    from sfbd_jax.data import shards

    shutil.copytree(src, dst)
    manifest = json.loads((dst / prepare.MANIFEST).read_text())
    for group, name in (("clean", "images"), ("noisy", "images"), ("eval_only", "originals")):
        entries = manifest["shards"][group][name]
        for i, entry in enumerate(entries):
            values = shards.read_images(str(dst), [entry])
            entries[i] = shards.write_shard(str(dst), entry["file"], values)
    manifest["format_version"] = 1
    manifest["settings"]["dtype"] = manifest["storage_rounding"]["dtype"] = "float32"
    del manifest["storage"]
    (dst / prepare.MANIFEST).write_text(json.dumps(manifest))


def test_old_float32_sets_still_read(prepared, tmp_path):
    out, _ = prepared
    old = tmp_path / "old"
    _as_format_1(out, old)
    assert np.load(old / "clean" / "images-00000.npy").dtype == np.float32
    for lazy in (False, True):
        new_data, old_data = PreparedDataset(str(out), lazy=lazy), PreparedDataset(str(old),
                                                                                    lazy=lazy)
        read = (lambda x: x.all_rows()) if lazy else (lambda x: x)
        np.testing.assert_array_equal(read(old_data.clean().images),
                                      read(new_data.clean().images))
        np.testing.assert_array_equal(read(old_data.noisy()[0].images),
                                      read(new_data.noisy()[0].images))
    # Preparing with today's default (float16) finds the float32 set and reads it as stored;
    # other settings are still refused.
    c = mnist_prepare_config(old)
    assert c.corrupt.dtype == "float16"
    assert prepare.prepare(c)["format_version"] == 1
    c.corrupt.split_seed += 1
    with pytest.raises(FileExistsError, match="split_seed"):
        prepare.prepare(c)
