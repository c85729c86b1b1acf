"""launch/*.sh: shellcheck-clean, and each --dry-run prints the exact commands it would run
(checked word by word; the remote command strings must be valid shell). local.sh also runs for
real in tests/test_multihost.py."""

import os
import shlex
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["local.sh", "gpu.sh", "tpu_vm.sh"]


def _dry_run(script, *args, ok=True):
    proc = subprocess.run(["bash", os.path.join(REPO, "launch", script), "--dry-run", *args],
                          capture_output=True, text=True)
    if ok:
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.splitlines()
    return proc


def _shellcheck() -> str:
    found = shutil.which("shellcheck") or os.path.join(os.path.dirname(sys.executable),
                                                       "shellcheck")
    assert os.path.exists(found), "shellcheck is missing: pip install -r requirements.txt"
    return found


@pytest.mark.parametrize("script", SCRIPTS)
def test_shellcheck_clean(script):
    proc = subprocess.run([_shellcheck(), os.path.join(REPO, "launch", script)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def _assert_valid_shell(text):
    proc = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True)
    assert proc.returncode == 0, (text, proc.stderr)


def test_local_dry_run():
    (line,) = _dry_run("local.sh", "configs/demo.py", "/tmp/run dir", "--config.seed=3")
    assert shlex.split(line) == ["python", "-m", "sfbd_jax.main", "--config", "configs/demo.py",
                                 "--workdir", "/tmp/run dir", "--config.seed=3"]
    lines = _dry_run("local.sh", "--processes", "2", "--devices-per-process", "2", "--port",
                     "4321", "configs/sfbd_smoke.py", "/tmp/w", "--config.seed=3")
    assert lines[-1] == "wait"
    for i, line in enumerate(lines[:2]):
        words = shlex.split(line)
        assert words[:10] == ["python", "-m", "sfbd_jax.main", "--config",
                              "configs/sfbd_smoke.py", "--workdir", "/tmp/w",
                              "--config.num_cpu_devices=2", "--distributed",
                              "--coordinator_address=localhost:4321"]
        assert words[10:13] == ["--num_processes=2", f"--process_id={i}", "--config.seed=3"]
        assert words[13:] == [">", f"/tmp/w/logs/process_{i}.log", "2>&1", "&"]
    assert not os.path.exists("/tmp/w/logs")  # a dry run creates nothing


@pytest.mark.parametrize("script,options", [
    ("local.sh", []), ("gpu.sh", []),
    ("tpu_vm.sh", ["--name", "n", "--zone", "z", "--bucket", "gs://b"])])
def test_dry_run_counts_wherever_it_stands(script, options):
    """--dry-run before CONFIG, between CONFIG and WORKDIR, or among the overrides: the same
    commands, and it is never passed on to the program."""
    path = os.path.join(REPO, "launch", script)
    outputs = []
    for args in (["--dry-run", *options, "configs/demo.py", "w", "--config.seed=3"],
                 [*options, "configs/demo.py", "--dry-run", "w", "--config.seed=3"],
                 [*options, "configs/demo.py", "w", "--config.seed=3", "--dry-run"]):
        proc = subprocess.run(["bash", path, *args], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        outputs.append(proc.stdout)
    assert outputs[0] == outputs[1] == outputs[2]
    assert "--config.seed=3" in outputs[0] and "--dry-run" not in outputs[0]


def test_local_rejects_bad_arguments():
    assert _dry_run("local.sh", "--processes", "0", "c", "w", ok=False).returncode == 2
    assert _dry_run("local.sh", "--bogus", "c", "w", ok=False).returncode == 2
    assert _dry_run("local.sh", "configs/demo.py", ok=False).returncode == 2


def test_gpu_single_node_dry_run():
    lines = _dry_run("gpu.sh", "configs/cifar10_sfbd.py", "/runs/c10", "--config.seed=1")
    assert lines[0] == f"cd {REPO}"
    assert shlex.split(lines[1]) == [
        "env", "XLA_PYTHON_CLIENT_MEM_FRACTION=.90", "python", "-m", "sfbd_jax.main",
        "--config", "configs/cifar10_sfbd.py", "--workdir", "/runs/c10", "--config.seed=1"]


def test_gpu_slurm_dry_run_prints_a_valid_batch_script():
    lines = _dry_run("gpu.sh", "--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu",
                     "--venv", "/opt/venv", "configs/cifar10_sfbd.py", "/shared/c10",
                     "--config.seed=1")
    assert lines[0] == "mkdir -p /shared/c10/logs"
    assert lines[1] == "sbatch <<'EOF'" and lines[-1] == "EOF"
    script = "\n".join(lines[2:-1])
    for directive in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4",
                      "--partition=gpu", "--output=/shared/c10/logs/slurm-%j.out"):
        assert f"#SBATCH {directive}" in script.splitlines()
    srun = [ln for ln in script.splitlines() if ln.startswith("srun")]
    assert shlex.split(srun[0])[2:] == [
        "python", "-m", "sfbd_jax.main", "--config", "configs/cifar10_sfbd.py", "--workdir",
        "/shared/c10", "--distributed", "--config.seed=1"]
    assert ". /opt/venv/bin/activate" in script
    _assert_valid_shell(script)


def test_tpu_vm_dry_run_prints_every_step():
    lines = _dry_run("tpu_vm.sh", "--name", "sfbd", "--zone", "us-central2-b", "--bucket",
                     "gs://my-bucket", "--accelerator-type", "v4-8", "--version",
                     "tpu-ubuntu2204-base", "--spot", "configs/cifar10_sfbd.py", "c10",
                     "--config.eval.metrics=fid,kid")
    words = [shlex.split(line) for line in lines]
    where = ["--zone", "us-central2-b"]
    assert words[0] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "sfbd", *where,
                        "--accelerator-type", "v4-8", "--version", "tpu-ubuntu2204-base",
                        "--spot"]
    assert words[1][:3] == ["git", "-C", REPO] and words[1][-1] == "HEAD"
    tarball = words[1][-2]
    assert words[2] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball,
                        "sfbd:sfbd_jax.tar.gz", *where, "--worker=all"]
    assert not os.path.exists(tarball)
    install, train, copy = words[3], words[4], words[5]
    for cmd, worker in ((install, "--worker=all"), (train, "--worker=all"),
                        (copy, "--worker=0")):
        assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "sfbd"]
        assert cmd[6:9] == [*where, worker] and cmd[9] == "--command"
        _assert_valid_shell(cmd[10])
    with open(os.path.join(REPO, "requirements.txt")) as f:
        jax_pin = next(line.strip() for line in f if line.startswith("jax=="))
    assert "-r sfbd_jax/requirements.txt" in install[10]
    assert f"jax[tpu]=={jax_pin.split('==')[1]}" in shlex.split(install[10])
    remote = shlex.split(train[10].split("&& ")[-1])
    assert remote == ["python", "-m", "sfbd_jax.main", "--distributed", "--config",
                      "configs/cifar10_sfbd.py", "--workdir", "~/sfbd_runs/c10",
                      "--config.eval.metrics=fid,kid"]
    assert shlex.split(copy[10]) == ["gcloud", "storage", "rsync", "--recursive",
                                     "~/sfbd_runs/c10", "gs://my-bucket/sfbd_runs/c10"]
    assert len(lines) == 6  # no --delete


def test_tpu_vm_pod_with_shared_dir_and_delete():
    lines = _dry_run("tpu_vm.sh", "--name", "pod", "--zone", "z", "--bucket", "gs://b",
                     "--shared-dir", "/mnt/nfs", "--skip-create", "--delete",
                     "configs/cifar10_sfbd.py", "c10")
    assert not lines[0].startswith("gcloud compute tpus tpu-vm create")
    assert "--workdir /mnt/nfs/sfbd_runs/c10" in lines[-3]
    assert shlex.split(lines[-1]) == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "pod",
                                      "--zone", "z", "--quiet"]


def test_tpu_vm_rejects_missing_or_bad_settings():
    base = ["--name", "n", "--zone", "z"]
    assert _dry_run("tpu_vm.sh", *base, "c", "r", ok=False).returncode == 2  # no bucket
    bad_bucket = _dry_run("tpu_vm.sh", *base, "--bucket", "s3://b", "c", "r", ok=False)
    assert bad_bucket.returncode == 2 and "gs://" in bad_bucket.stderr
    bad_run = _dry_run("tpu_vm.sh", *base, "--bucket", "gs://b", "c", "a b", ok=False)
    assert bad_run.returncode == 2
