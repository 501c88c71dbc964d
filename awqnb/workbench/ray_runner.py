"""Sweeps on Ray: connect to a cluster (or start a local one listening on 127.0.0.1 only), check that
a node can hold one run, and run each run as a Ray task with its resource request (`cpus_per_run`,
`gpus_per_run`, fractions allowed), retried by Ray for crashed workers (`max_retries`; a failing
notebook is a result, not retried). The task returns the run's files to the driver, which commits
them: the cluster needs no shared disk."""
from __future__ import annotations

import logging
import socket
from contextlib import contextmanager, nullcontext
from typing import Iterable

from awqnb.core.errors import AwqnbError
from awqnb.workbench.execute import execute_run, failed_result, make_payload

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


@contextmanager
def _loopback_only():
    """A local cluster that listens on 127.0.0.1 only (GCS, raylet, workers, agents), not on every
    interface. Ray binds its servers to all interfaces unless the node's address is 127.0.0.1, and
    ray.init turns a 127.0.0.1 `_node_ip_address` into the host's own address; only its
    single-machine mode (macOS/Windows, `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, read at import)
    keeps the loopback address. That is what this switches on, for the ray.init call only."""
    from ray._private import ray_constants

    old = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if old is None:
            del ray_constants.ENABLE_RAY_CLUSTER
        else:
            ray_constants.ENABLE_RAY_CLUSTER = old


def _loopback_cluster(host: str, port: int) -> bool:
    """Whether the cluster at host:port listens on 127.0.0.1 only (as a local one awqnb started):
    a driver must then connect in loopback mode too, or ray.init turns 127.0.0.1 into this host's
    own address, where nothing answers."""
    if host not in (LOOPBACK, "localhost"):
        return False
    from ray._private import services

    own = services.get_node_ip_address()
    if own == LOOPBACK:
        return False
    try:
        socket.create_connection((own, port), timeout=2).close()
        return False
    except OSError:
        return True


def check_ray(address: str | None, cpus_per_run: float, gpus_per_run: float | None, num_cpus: int | None = None):
    """Connect to Ray (an existing cluster at `address`, the one already initialised here, or a new
    local one: listening on 127.0.0.1 only, with the token authentication Ray turns on for it unless
    RAY_AUTH_MODE says otherwise) and check that some node can hold one run; returns the GPUs each
    run asks for. AwqnbError for an unreachable address or a request no node can satisfy."""
    try:
        import ray
    except ImportError as e:
        raise AwqnbError("the ray executor needs Ray: pip install ray (pinned in requirements.txt).") from e
    loopback = False
    if address and address != "auto":  # a quick probe: ray.init would retry for a minute
        hostport = address.split("://", 1)[-1].rsplit("/", 1)[0]
        host, _, port = hostport.rpartition(":")
        try:
            socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
        except (OSError, ValueError) as e:
            raise AwqnbError(f"cannot reach the Ray cluster at --ray-address {address}: {e}. "
                             "Start it (`ray start --head`) or fix the address.") from None
        loopback = "://" not in address and _loopback_cluster(host, int(port))
    if not ray.is_initialized():
        # Ray's own notices (dashboard, auth token) stay out of the terminal; errors still show
        kw = dict(include_dashboard=False, logging_level=logging.ERROR, log_to_driver=True)
        try:
            if address:
                with _loopback_only() if loopback else nullcontext():
                    ray.init(address=address, **kw)
            else:
                with _loopback_only():
                    ray.init(num_cpus=num_cpus, **kw)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise AwqnbError(f"cannot start or reach Ray ({address or 'local'}): {str(e).strip().splitlines()[-1]} "
                             "(a cluster with token authentication also needs its token: RAY_AUTH_TOKEN, "
                             "or `ray get-auth-token`).") from None
        if not address:
            host = ray.get_runtime_context().gcs_address.rpartition(":")[0]
            if host != LOOPBACK:
                ray.shutdown()
                raise AwqnbError(f"the local Ray cluster would listen on {host}, not only on {LOOPBACK} (this Ray "
                                 f"version, {ray.__version__}, binds differently from the pinned one); start a "
                                 "cluster yourself and pass --ray-address (README: Sweeps on Ray).")
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    max_gpu = max((r.get("GPU", 0) for r in nodes), default=0)
    max_cpu = max((r.get("CPU", 0) for r in nodes), default=0)
    if gpus_per_run is None:
        gpus_per_run = 1.0 if max_gpu >= 1 else 0.0  # a whole GPU where there is one, else CPU only
    if gpus_per_run < 0 or cpus_per_run <= 0:
        raise AwqnbError(f"a run must ask for > 0 CPUs and >= 0 GPUs (got {cpus_per_run} CPUs, {gpus_per_run} GPUs).")
    if gpus_per_run > 1 and gpus_per_run != int(gpus_per_run):
        raise AwqnbError(f"--gpus-per-run {gpus_per_run}: a fraction must be below 1 (Ray shares one GPU, "
                         "it does not split a run across part of several).")
    fits = [r for r in nodes if r.get("CPU", 0) >= cpus_per_run and r.get("GPU", 0) >= gpus_per_run]
    if not fits:
        raise AwqnbError(f"no Ray node can run a report with {cpus_per_run:g} CPU(s) and {gpus_per_run:g} GPU(s): "
                         f"the largest node has {max_cpu:g} CPUs and {max_gpu:g} GPUs. Lower --gpus-per-run / "
                         "--cpus-per-run or add a node.")
    return gpus_per_run



def run_ray(pending, committer, bars, hide_code, timeout, env, cpus, gpus, max_retries) -> Iterable:  # of sweep.SweepRun, as `committer` makes them
    import ray

    task = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=max_retries, retry_exceptions=False)(execute_run)
    refs = {}
    for spec, claim in pending:
        ref = task.options(name=f"awqnb:{spec.rel}").remote(make_payload(spec, bars, hide_code, timeout, env))
        refs[ref] = (spec, claim)
    try:
        while refs:
            done, _ = ray.wait(list(refs), num_returns=1)
            for ref in done:
                spec, claim = refs.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayError as e:  # a worker that died past its retries, a cancelled task
                    log.error("run %s: Ray task failed: %s", spec.rel, str(e).strip().splitlines()[0][:300])
                    result = failed_result(spec, f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}")
                yield committer(spec, claim, result)
    finally:
        for ref in refs:  # interrupted: stop what is still queued or running
            ray.cancel(ref, force=True)
