"""`zturbo serve`: arguments, safety checks (bind address, data directory lock, open-file limit),
the service and its workers started, and only then the web framework's imports, the routes and
uvicorn with connection bounds (connections.py), so that those imports run while the workers load."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import fcntl
import functools
import ipaddress
import logging
import os
import resource
import signal
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import DEFAULT_LORA_CACHE_BYTES, SERVE_MAX_BATCH, SERVE_MAX_BATCH_PIXELS, env
from ..errors import DeviceError, InvalidRequestError

if TYPE_CHECKING:
    from .service import Service

log = logging.getLogger("zturbo")

FD_RESERVE = 256  # descriptors kept for everything but client connections: SQLite, images, worker pipes


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--no-ui", action="store_true", help="serve the API only, without the web UI at /ui")
    p.add_argument(
        "--gpus",
        default=None,
        help="one worker per listed CUDA device index, e.g. 0,1; 'cpu' for one CPU worker "
        "(default: --device if given, else every visible GPU, else one worker on the CPU)",
    )
    p.add_argument("--queue-size", type=int, default=64, help="most jobs waiting; more get 429 (default 64)")
    p.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on /v1/* and /metrics (default $ZTURBO_API_KEY; "
        "prefer the variable: arguments are visible to other users)",
    )
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without an API key")
    p.add_argument("--allowed-hosts", type=lambda t: tuple(filter(None, t.split(","))), default=(),
                   help="without an API key, Host names answered besides loopback ones and --host, "
                   "comma-separated; '*' for any (default none: a guard against DNS rebinding)")  # fmt: skip
    _storage_arguments(p)
    p.add_argument("--job-timeout", type=float, default=600.0, help="seconds one job may run (default 600)")
    _batch_arguments(p)
    p.add_argument(
        "--shutdown-grace",
        type=float,
        default=30.0,
        help="on shutdown, seconds running jobs get to finish before they are queued again (default 30)",
    )
    p.add_argument(
        "--sync-timeout",
        type=float,
        default=600.0,
        help="seconds the OpenAI and A1111 routes wait for their job before answering 504 (default 600); "
        "a client that hangs up first cancels it",
    )
    _a1111_arguments(p)
    p.add_argument(
        "--max-connections",
        type=int,
        default=1000,
        help="most open client connections; past it the longest-idle one is closed, or, when every one is "
        "busy, the new one is answered 503 (default 1000, lowered to fit the open-file limit)",
    )
    p.add_argument(
        "--keep-alive-timeout",
        type=float,
        default=5.0,
        help="seconds a connection may stay open with no request in progress (default 5)",
    )
    p.add_argument(
        "--read-timeout",
        type=float,
        default=30.0,
        help="seconds a request's headers and body may take to arrive once it starts (default 30)",
    )
    _model_arguments(p)
    _ray_arguments(p)
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))


def _ray_arguments(p: argparse.ArgumentParser) -> None:
    """A Ray Serve deployment instead of this machine's workers (docs/ray.md)."""
    g = p.add_argument_group("Ray Serve (docs/ray.md)")
    g.add_argument("--ray", default=None, metavar="ADDRESS",
                   help="deploy on the Ray cluster at ADDRESS ('auto': the local one) rather than run workers "
                   "here: an HTTP ingress and one GPU replica per --ray-gpus-per-replica GPUs, on a "
                   "postgresql:// --store and a --data-dir every node mounts")  # fmt: skip
    g.add_argument("--ray-min-replicas", type=int, default=1, help="fewest GPU replicas (default 1)")
    g.add_argument("--ray-max-replicas", type=int, default=1, help="most GPU replicas, reached under load (default 1)")
    g.add_argument(
        "--ray-gpus-per-replica", type=float, default=1.0, help="GPUs each replica holds; 0: CPU (default 1)"
    )
    g.add_argument("--ray-cpus-per-replica", type=float, default=1.0, help="CPUs each replica holds (default 1)")
    g.add_argument("--ray-resource", action="append", default=[], metavar="NAME=AMOUNT",
                   help="a custom Ray resource each replica holds, e.g. a node pool's (repeatable)")  # fmt: skip
    g.add_argument("--ray-max-ongoing", type=int, default=8,
                   help="most run requests one replica holds at once, one running and the rest waiting for its "
                   "GPU (default 8)")  # fmt: skip
    g.add_argument("--ray-target-ongoing", type=float, default=2.0,
                   help="run requests per replica the autoscaler aims at: more adds replicas (default 2)")  # fmt: skip
    g.add_argument("--ray-scale-delay", type=float, default=30.0, metavar="SECONDS",
                   help="seconds the load must stay low before a replica is taken away (default 30)")  # fmt: skip


def _a1111_arguments(p: argparse.ArgumentParser) -> None:
    """The A1111 routes' policy for the Stable Diffusion defaults their clients send (docs/api.md)."""
    p.add_argument(
        "--client-defaults",
        choices=("turbo", "honour"),
        default="turbo",
        help="A1111 routes (/sdapi/v1): 'turbo' runs the served model's own steps and CFG (Turbo: 8 and 0; the "
        "base model: 28 and 4) where a client sends Stable Diffusion's usual steps (20-50) and CFG (1-12), "
        "'honour' runs them as sent; responses list what was mapped",
    )


def _model_arguments(p: argparse.ArgumentParser) -> None:
    """What the served model accepts, beyond the model options every command shares."""
    p.add_argument("--max-pixels", type=int, default=None, help="largest width*height accepted")
    p.add_argument(
        "--controlnet",
        default=None,
        metavar="REPO_OR_FILE",
        help="a ControlNet every worker loads with the model, for jobs' control images: a hub repo id (REPO:FILE "
        "picks one of its files), a diffusers directory or a .safetensors file (default $ZTURBO_CONTROLNET)",
    )


def _batch_arguments(p: argparse.ArgumentParser) -> None:
    """How workers batch compatible jobs (docs/server.md, "Batching and the writer")."""
    p.add_argument(
        "--max-batch",
        type=int,
        default=SERVE_MAX_BATCH,
        help="most images a worker makes in one batch of compatible jobs (fewer where --max-batch-pixels or its "
        f"free GPU memory holds fewer); 1: one job at a time (default {SERVE_MAX_BATCH})",
    )
    p.add_argument(
        "--max-batch-pixels",
        type=int,
        default=SERVE_MAX_BATCH_PIXELS,
        help="most pixels of all images in one batch, at least one job whatever its size (default "
        f"{SERVE_MAX_BATCH_PIXELS}: four 1024x1024 images, seven 768x768)",
    )
    p.add_argument(
        "--batch-window-ms",
        type=float,
        default=2.0,
        help="milliseconds a free worker waits for a job to batch with a lone waiting one (default 2)",
    )


def _storage_arguments(p: argparse.ArgumentParser) -> None:
    """Where the server keeps its queue, images and LoRAs."""
    p.add_argument(
        "--data-dir",
        default=None,
        help="queue database and images (default $ZTURBO_DATA_DIR or ~/.local/share/zturbo)",
    )
    p.add_argument(
        "--store",
        default=None,
        metavar="URL",
        help="the job queue: sqlite (a file in the data directory, one machine) or postgresql://USER@HOST:PORT/DB, "
        "shared by the servers of many machines, which then need one shared --data-dir (default $ZTURBO_STORE, "
        "else sqlite; docs/server.md, 'Many machines')",
    )
    p.add_argument(
        "--node-lease",
        type=float,
        default=None,
        metavar="SECONDS",
        help="a postgresql:// store: how long this server may go unheard before the others queue its running "
        "jobs again (default 30; each server is judged by its own)",
    )
    p.add_argument(
        "--lora-dir",
        default=None,
        help="the LoRA files jobs may name (by name only, never by path); made if missing "
        "(default $ZTURBO_LORA_DIR, else DATA_DIR/loras)",
    )
    p.add_argument(
        "--lora-cache",
        type=float,
        default=None,
        metavar="GIB",
        help="host memory each worker keeps parsed LoRAs in, the least recently used dropped first (default 2)",
    )


def main(args: argparse.Namespace, runtime_config: Any) -> int:
    """Run until SIGINT/SIGTERM; returns the exit status."""
    from .pgstore import redact
    from .service import Service

    settings = serve_settings(args, runtime_config)
    connections = connection_bound(args.max_connections, raise_file_limit())
    lock = _lock_data_dir(settings.data_dir, settings.store)
    log.info("serving %s on http://%s:%d with workers on %s; data in %s (queue: %s), LoRAs in %s",
             runtime_config.model, args.host, args.port, ", ".join(settings.devices), settings.data_dir,
             redact(settings.store), settings.lora_dir)  # fmt: skip
    started = _run(Service(settings), args, connections)
    lock.close()
    return 0 if started else 3  # 3: uvicorn's status for a server that never started


def serve_settings(args: argparse.Namespace, config: Any, devices: list[str] | None = None) -> Any:
    """What the app needs from `zturbo serve`'s arguments, every one checked before anything loads.
    `devices`: where the jobs run, when not this machine's workers (a Ray deployment's replicas)."""
    from ..loader import resolve_model
    from .loras import model_targets
    from .service import ServeSettings

    api_key = args.api_key or env("ZTURBO_API_KEY") or None
    check_bind(args.host, api_key, insecure=args.insecure)
    _check_numbers(args)
    store = store_location(args)
    devices = devices if devices is not None else worker_devices(args.gpus, args.device)
    source = resolve_model(
        config.model, weights=False, files=config.component_files()
    )  # fail on a bad model name before binding
    data_dir = Path(args.data_dir or env("ZTURBO_DATA_DIR") or Path.home() / ".local/share/zturbo")
    data_dir.mkdir(parents=True, exist_ok=True)
    lora_dir = Path(args.lora_dir or config.lora_dir or data_dir / "loras").expanduser()
    return ServeSettings(
        config=config,
        data_dir=data_dir,
        store=store,
        devices=devices,
        limits=_model_limits(source, config),
        api_key=api_key,
        queue_size=args.queue_size,
        node_lease_s=args.node_lease,
        job_timeout=args.job_timeout,
        max_batch=args.max_batch,
        max_batch_pixels=args.max_batch_pixels,
        batch_window_ms=args.batch_window_ms,
        shutdown_grace=args.shutdown_grace,
        sync_timeout=args.sync_timeout,
        client_defaults=args.client_defaults,
        allowed_hosts=(args.host, *args.allowed_hosts),
        # A repo id also answers to its bare name: modelscope:owner/name is owner/name on either hub.
        model_names=tuple({config.model, source.name, *filter(None, [source.repo_id])}),
        lora_dir=lora_dir,
        lora_cache_bytes=DEFAULT_LORA_CACHE_BYTES if args.lora_cache is None else int(args.lora_cache * 2**30),
        lora_targets=functools.partial(model_targets, source.config("transformer")),
    )


def _run(service: Service, args: argparse.Namespace, connections: int) -> bool:
    """Start the workers, then build the HTTP app around them and serve it, at most `connections`
    client connections open; stop the workers when it ends. Whether uvicorn started."""
    # While the app's and the UI's imports run, SIGTERM ends this process through the `finally`
    # below, which stops the workers started here; then uvicorn's handlers take over (a graceful stop).
    default = signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        service.start()  # the workers load while the web framework, the routes, the UI and uvicorn come up
        server = _http_server(service, args, connections)
        signal.signal(signal.SIGTERM, default)
        server.run()
    finally:
        signal.signal(signal.SIGTERM, default)
        service.stop()  # a no-op after the lifespan's; stops the workers when uvicorn never started
    return bool(server.started)


def _exit_on_signal(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def _http_server(service: Service, args: argparse.Namespace, connections: int) -> Any:
    """uvicorn for the API around `service`, with the web UI mounted on the same port unless --no-ui."""
    from .app import service_app  # FastAPI, pydantic and the routes: imported once the workers have started
    from .connections import BoundedConfig, ConnectionLimits, StoppingServer

    limits = ConnectionLimits(connections, keep_alive_s=args.keep_alive_timeout, read_timeout_s=args.read_timeout)
    app = service_app(service)
    if not args.no_ui:
        from .ui import api_base_for
        from .ui_app import mount

        mount(app, api_base_for(args.host, args.port))  # a client of the API above, on the same port
    # The grace goes to uvicorn as a number, 0 included: None there means wait for clients forever.
    config = BoundedConfig(app, limits, host=args.host, port=args.port, log_level=args.log_level,
                           timeout_graceful_shutdown=args.shutdown_grace)  # type: ignore[arg-type]  # fmt: skip
    return StoppingServer(config, on_stop=service.begin_stop)


def _model_limits(source: Any, config: Any) -> Any:
    """What requests may ask of the served model: its sizes, and the ControlNet's input width read
    from its header (no weights: the API process validates, the workers load), before binding."""
    limits = source.limits(config.max_pixels, config.preset)
    if config.controlnet is None:
        return limits
    from ..control import controlnet_in_dim

    return dataclasses.replace(limits, control_in_dim=controlnet_in_dim(config.controlnet))


def check_bind(host: str, api_key: str | None, *, insecure: bool) -> None:
    if api_key or insecure or is_loopback(host):
        return
    raise InvalidRequestError(
        f"refusing to bind {host} without an API key: anyone who can reach it could use the GPUs; "
        f"pass --api-key KEY (or set $ZTURBO_API_KEY), bind 127.0.0.1, or pass --insecure"
    )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:  # a host name: loopback only if every address it resolves to is
            infos = socket.getaddrinfo(host, None)
        except OSError:
            return False
        return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def worker_devices(gpus: str | None, device: str | None) -> list[str]:
    """The device of each worker."""
    if gpus is None:
        if device not in (None, "auto"):
            return [device]
        count = cuda_device_count()
        if count:
            return [f"cuda:{i}" for i in range(count)]
        import torch

        if torch.cuda.is_available():
            return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        return ["mps"] if torch.backends.mps.is_available() else ["cpu"]
    if gpus.strip() in ("cpu", "mps"):
        return [gpus.strip()]
    try:
        indices = [int(x) for x in gpus.split(",") if x.strip()]
    except ValueError:
        raise InvalidRequestError(f"--gpus {gpus!r} is not a comma-separated list of GPU indices or 'cpu'") from None
    if not indices or len(set(indices)) != len(indices) or min(indices) < 0:
        raise InvalidRequestError(f"--gpus {gpus!r} must list distinct GPU indices >= 0, e.g. 0,1")
    count = cuda_device_count()
    if count is None:
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    missing = [i for i in indices if i >= count]
    if missing:
        raise DeviceError(f"--gpus {gpus}: GPU {missing[0]} does not exist; this machine has {count} GPU(s)")
    return [f"cuda:{i}" for i in indices]


def cuda_device_count() -> int | None:
    """The CUDA GPUs this process may use (CUDA_VISIBLE_DEVICES applies), asked of the NVIDIA driver
    itself: the server counts its workers before it starts them, and importing torch to count would
    hold every worker's start back by the seconds torch takes to import. None where the driver does
    not load or answer (no NVIDIA GPU, another platform, ROCm): torch counts then."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    count = ctypes.c_int(0)
    try:
        if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return None
    except AttributeError:  # a library by that name without the driver's entry points
        return None
    return count.value


def _check_numbers(args: argparse.Namespace) -> None:
    if not 0 < args.port < 65536:
        raise InvalidRequestError(f"--port {args.port} is out of range; allowed 1..65535")
    if args.node_lease is not None and not 1 <= args.node_lease <= 3600:
        raise InvalidRequestError(f"--node-lease {args.node_lease} must be 1..3600 seconds")
    if args.queue_size < 1:
        raise InvalidRequestError(f"--queue-size {args.queue_size} must be at least 1")
    if not args.job_timeout > 0:
        raise InvalidRequestError(f"--job-timeout {args.job_timeout} must be a positive number of seconds")
    if args.max_batch < 1:
        raise InvalidRequestError(f"--max-batch {args.max_batch} must be at least 1 image")
    if args.max_batch_pixels < 1:
        raise InvalidRequestError(f"--max-batch-pixels {args.max_batch_pixels} must be at least 1 pixel")
    if not 0 <= args.batch_window_ms <= 1000:
        raise InvalidRequestError(f"--batch-window-ms {args.batch_window_ms} must be 0..1000 milliseconds")
    if not args.sync_timeout > 0:
        raise InvalidRequestError(f"--sync-timeout {args.sync_timeout} must be a positive number of seconds")
    if args.shutdown_grace < 0:
        raise InvalidRequestError(f"--shutdown-grace {args.shutdown_grace} must be 0 or more seconds")
    if args.lora_cache is not None and not 0 <= args.lora_cache < float("inf"):  # made a whole number of bytes
        raise InvalidRequestError(f"--lora-cache {args.lora_cache} must be 0 or more GiB (a finite number)")
    if args.max_connections < 1:
        raise InvalidRequestError(f"--max-connections {args.max_connections} must be at least 1")
    for flag in ("keep_alive_timeout", "read_timeout"):
        if not getattr(args, flag) > 0:
            name = "--" + flag.replace("_", "-")
            raise InvalidRequestError(f"{name} {getattr(args, flag)} must be a positive number of seconds")


def raise_file_limit() -> int:
    """Raise this process's open-file limit to its hard limit where allowed; the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as e:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, target, e)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def connection_bound(requested: int, file_limit: int) -> int:
    """The connections the file limit leaves room for, at most `requested`."""
    room = file_limit - FD_RESERVE
    if room < 1:
        raise InvalidRequestError(
            f"the open-file limit is {file_limit}; the server needs more than {FD_RESERVE}: raise it (ulimit -n)"
        )
    if requested > room:
        log.warning("--max-connections %d lowered to %d: the open-file limit is %d", requested, room, file_limit)
    return min(requested, room)


def store_location(args: argparse.Namespace) -> str:
    """The job queue's location (`stores.check_store`), before anything loads."""
    from .stores import DEFAULT_STORE, STORE_ENV, check_store

    return check_store(args.store or env(STORE_ENV) or DEFAULT_STORE)


def _lock_data_dir(data_dir: Path, store: str) -> contextlib.ExitStack:
    """One server per data directory and per SQLite file with the SQLite queue: two would both
    recover and run the same jobs. A file given by its path may lie outside the data directory (a
    faster disk), so it is locked too, by `<file>.lock` beside it, rather than refused. The servers
    of a shared queue share the directory, its claims keeping them apart: nothing to hold then.
    The locks are held until the returned stack closes."""
    from .pgstore import is_url
    from .stores import DEFAULT_STORE

    held = contextlib.ExitStack()
    if is_url(store):
        return held
    try:
        held.enter_context(_hold(data_dir / "server.lock", f"another zturbo serve is using {data_dir}; give each "
                                 "server its own --data-dir"))  # fmt: skip
        if store != DEFAULT_STORE:
            db = Path(store).expanduser()
            held.enter_context(_hold(db.with_name(f"{db.name}.lock"), f"another zturbo serve is using the job "
                                     f"database {db}; give each server its own --store file"))  # fmt: skip
    except BaseException:
        held.close()
        raise
    return held


def _hold(path: Path, busy: str) -> Any:
    """`path` opened and locked for the life of the server (the open file, which unlocks as it
    closes); `busy`: the InvalidRequestError's message when another process holds it."""
    try:
        f = open(path, "a+")  # noqa: SIM115 - held open for the life of the server
    except OSError as e:
        raise InvalidRequestError(f"cannot make the lock file {path}: {e.strerror or e}; check that its "
                                  "directory exists and is writable") from None  # fmt: skip
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise InvalidRequestError(busy) from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f
