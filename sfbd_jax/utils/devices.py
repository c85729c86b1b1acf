"""Device set-up: CPU host devices, the data-parallel mesh and its shardings.

Everything here works the same on 1 CPU, N GPUs on one host, and a multi-host TPU slice (after
`jax.distributed.initialize()`): the mesh spans `jax.devices()` (all processes' devices), the
batch is split along the mesh axis ``data`` and the training state is replicated.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def configure_cpu_devices(num_devices: int = 0) -> None:
    """Expose ``num_devices`` CPU host devices (0: one per CPU core).

    Must run before JAX initialises its backends (before the first computation). It only affects
    the CPU platform, so on a GPU/TPU machine the accelerators stay the default devices. A count
    already forced through ``XLA_FLAGS`` or ``jax_num_cpu_devices`` is left as it is.
    """
    if num_devices < 0:
        raise ValueError(f"num_cpu_devices must be >= 0 (0 = all cores), got {num_devices}")
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return
    if jax.config.jax_num_cpu_devices not in (-1, None):
        return
    count = num_devices or (os.cpu_count() or 1)
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError as err:  # backends already initialised: keep what exists
        if "already" not in str(err).lower():
            raise


def make_data_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh with axis ``data`` over the first ``num_devices`` global devices (all if None)."""
    devices = jax.devices()
    if num_devices is not None:
        if not 1 <= num_devices <= len(devices):
            raise ValueError(f"asked for a mesh of {num_devices} devices, {len(devices)} exist")
        devices = devices[:num_devices]
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding that keeps a full copy on every device of ``mesh`` (the training state)."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, leading_axes: int = 0) -> NamedSharding:
    """Sharding that splits the batch axis over ``data``; ``leading_axes`` unsplit axes come first
    (e.g. 1 for a stack of batches of shape (steps, batch, ...))."""
    return NamedSharding(mesh, P(*([None] * leading_axes), DATA_AXIS))


def check_divisible(global_batch: int, mesh: Mesh, what: str = "global batch size") -> None:
    """Raise a clear error when ``global_batch`` cannot be split evenly over the mesh."""
    n = mesh.devices.size
    if global_batch <= 0 or global_batch % n:
        raise ValueError(
            f"{what} {global_batch} is not a positive multiple of the number of devices ({n}); "
            f"choose a multiple of {n}"
        )


def process_rows(sharding: NamedSharding, global_shape: tuple[int, ...], axis: int) -> slice:
    """The contiguous range of rows along ``axis`` that this process's devices hold."""
    index_map = sharding.addressable_devices_indices_map(global_shape)
    starts, stops = [], []
    for index in index_map.values():
        sl = index[axis]
        starts.append(sl.start or 0)
        stops.append(global_shape[axis] if sl.stop is None else sl.stop)
    return slice(min(starts), max(stops))


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """``jax.distributed.initialize``: with no arguments the coordinator, process count and id
    come from the cluster environment (Cloud TPU, SLURM, Open MPI, Kubernetes, or the
    ``JAX_COORDINATOR_ADDRESS`` variable); give all three to run several processes by hand, e.g.
    on localhost. On the CPU platform, processes exchange data through gloo collectives
    (``jax_cpu_collectives_implementation``)."""
    given = [v is not None for v in (coordinator_address, num_processes, process_id)]
    if any(given) and not all(given):
        raise ValueError("give all of coordinator_address, num_processes and process_id, or none "
                         "of them (to detect them from the cluster environment)")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)


def put_global(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A host array that every process holds in full, placed with ``sharding``: each process
    transfers only the slices its own devices hold (works across hosts)."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def to_host(x: jax.Array) -> np.ndarray:
    """The full value of a (possibly multi-host sharded) array on every process."""
    if x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def check_shared_directory(directory: str) -> None:
    """With several processes, check that ``directory`` is one file system seen by all of them
    (an NFS or gcsfuse mount): checkpoints, data shards and run records are written once, by
    process 0 or by Orbax's coordinated save, and read by every process."""
    if jax.process_count() == 1:
        return
    token = os.path.join(directory, ".shared_directory_check")
    if jax.process_index() == 0:
        os.makedirs(directory, exist_ok=True)
        with open(token, "w") as f:
            f.write(str(os.getpid()))
    sync_processes("shared-directory-written")
    seen = os.path.exists(token)
    sync_processes("shared-directory-read")
    if jax.process_index() == 0:
        os.remove(token)
    if not seen:
        raise RuntimeError(
            f"process {jax.process_index()} cannot see files that process 0 wrote in "
            f"{directory}: a multi-host run needs a --workdir on a file system shared by every "
            "host (NFS, Filestore, or a GCS bucket mounted with gcsfuse at the same path)")


def sync_processes(name: str) -> None:
    """Barrier across processes (no-op with one): e.g. wait until process 0 wrote a file."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
