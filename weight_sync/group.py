"""A standalone process group for weight transfer, separate from the engine's TP group.

The group owns its own ``TCPStore`` (hosted by rank 0), ``PrefixStore``s keyed by
``group_name`` and a ``ProcessGroupGloo`` (CPU) or ``ProcessGroupNCCL`` (CUDA). The store keys
are laid out exactly as the stock trainer recipe lays them out (SGLang's tests, verl, slime,
OpenRLHF, AReaL: ``rendezvous("tcp://addr:port")``, ``PrefixStore(group_name, store)``, then
torch's ``_new_process_group_helper``, which prefixes ``f"{group_name}/"`` and the device
type), so a trainer built that way joins the group an engine forms here, and the other way
round. It is never
registered with ``torch.distributed``'s default world, so it coexists with whatever group the
engine or trainer already uses. Collectives are called on the group object directly because
``dist.broadcast(src=...)`` rejects unregistered groups.

Only the gloo path is exercised in this repository's tests (CPU-only CI); the NCCL branch is the
same calls on ``ProcessGroupNCCL`` and is untested here.

Usage (every member calls this concurrently; rank 0 is normally the trainer)::

    port = free_port(host)                        # on the trainer, then sent to the engines
    group = create_group(host, port, rank, world_size, f"refit-{uuid}", "gloo", timeout_s=120)
    ...
    group.destroy()
"""

from __future__ import annotations

import datetime
import socket
from typing import Any

import torch
import torch.distributed as dist

from weight_sync.errors import WeightSyncError, WeightSyncTimeout

_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def free_port(host: str = "127.0.0.1") -> int:
    """Ask the OS for a currently free TCP port on ``host``.

    The port is released before returning, so another process could take it first; callers that
    lose that race get a clear ``WeightSyncError`` from :func:`create_group` and can retry.
    """
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _is_timeout(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "timed out" in text or "timeout" in text


class PendingOp:
    """An in-flight collective; :meth:`wait` converts backend errors into ``WeightSyncError``."""

    def __init__(
        self, group: WeightGroup, work: Any, what: str, tensor: torch.Tensor | None = None
    ) -> None:
        self._group = group
        self._work = work
        self._what = what
        self._tensor = tensor  # alive until the op is done, whatever the backend keeps

    def wait(self) -> None:
        """Block until done; raises ``WeightSyncTimeout`` past the group timeout."""
        try:
            # The backend enforces the group timeout itself (gloo: per recv; NCCL: watchdog);
            # passing it here also bounds the CPU-side wait on NCCL.
            done = self._work.wait(datetime.timedelta(seconds=self._group.timeout_s))
        except Exception as exc:  # backend errors are plain RuntimeErrors
            raise self._group.error(self._what, exc) from exc
        if done is False:
            raise self._group.error(self._what, TimeoutError("wait() timed out"))


class WeightGroup:
    """Owner of one standalone process group and its store. Create with :func:`create_group`."""

    def __init__(
        self,
        name: str,
        rank: int,
        world_size: int,
        backend: str,
        timeout_s: float,
        device: torch.device,
        pg: Any,
        store: Any,
    ) -> None:
        self.name = name
        self.rank = rank
        self.world_size = world_size
        self.backend = backend
        self.timeout_s = timeout_s
        self.device = device
        self._pg = pg
        self._store = store  # keeps the TCPStore (server on rank 0) alive as long as the group

    @property
    def process_group(self) -> Any:
        """The raw torch ProcessGroup (call its methods directly; it is outside the default
        world, so ``torch.distributed`` free functions reject it)."""
        return self._live_pg("process_group")

    def error(self, what: str, exc: BaseException) -> WeightSyncError:
        """Build the error for a failed ``what`` (timeout vs. other failure)."""
        where = f"weight-sync group {self.name!r} (rank {self.rank}/{self.world_size})"
        if _is_timeout(exc):
            return WeightSyncTimeout(f"{where}: {what} timed out after {self.timeout_s}s: {exc}")
        return WeightSyncError(f"{where}: {what} failed: {exc}")

    def _live_pg(self, what: str) -> Any:
        if self._pg is None:
            raise WeightSyncError(f"weight-sync group {self.name!r}: {what} after destroy()")
        return self._pg

    def broadcast_async(self, tensor: torch.Tensor, src: int, what: str = "broadcast") -> PendingOp:
        """Start broadcasting ``tensor`` (in place on receivers) from group rank ``src``."""
        pg = self._live_pg(what)
        if not 0 <= src < self.world_size:
            raise ValueError(f"src rank {src} outside group of size {self.world_size}")
        opts = dist.BroadcastOptions()
        opts.rootRank = src
        opts.rootTensor = 0
        opts.timeout = datetime.timedelta(seconds=self.timeout_s)
        try:
            work = pg.broadcast([tensor], opts)
        except Exception as exc:
            raise self.error(what, exc) from exc
        return PendingOp(self, work, what, tensor)

    def broadcast(self, tensor: torch.Tensor, src: int, what: str = "broadcast") -> None:
        """Synchronous :meth:`broadcast_async`."""
        self.broadcast_async(tensor, src, what).wait()

    def barrier(self, what: str = "barrier") -> None:
        """Block until every rank reaches the barrier (bounded by the group timeout)."""
        pg = self._live_pg(what)
        opts = dist.BarrierOptions()
        opts.timeout = datetime.timedelta(seconds=self.timeout_s)
        if self.device.type == "cuda":
            opts.device_ids = [self.device.index or 0]
        try:
            work = pg.barrier(opts)
        except Exception as exc:
            raise self.error(what, exc) from exc
        PendingOp(self, work, what).wait()

    def destroy(self) -> None:
        """Shut the process group down and release the store (idempotent)."""
        pg, self._pg = self._pg, None
        if pg is not None and hasattr(pg, "shutdown"):
            try:
                pg.shutdown()
            except Exception:  # best effort: a dead peer must not block teardown
                pass
        # Dropping the last reference stops the TCPStore server on rank 0.
        self._store = None

    def __enter__(self) -> WeightGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    def __repr__(self) -> str:
        return (
            f"WeightGroup(name={self.name!r}, rank={self.rank}, world_size={self.world_size}, "
            f"backend={self.backend!r}, alive={self._pg is not None})"
        )


MAX_TIMEOUT_S = 10**7  # ~116 days; a larger (or infinite) one overflows the timedelta


def check_timeout(timeout_s: object) -> None:
    """A group's timeout: seconds in (0, MAX_TIMEOUT_S], else ValueError naming it."""
    if (
        isinstance(timeout_s, bool)
        or not isinstance(timeout_s, (int, float))
        or not 0 < timeout_s <= MAX_TIMEOUT_S
    ):
        raise ValueError(f"invalid timeout_s={timeout_s!r}: must be in (0, {MAX_TIMEOUT_S}]")


def create_group(
    master_address: str,
    master_port: int,
    rank: int,
    world_size: int,
    group_name: str,
    backend: str = "gloo",
    timeout_s: float = 300.0,
    device: torch.device | None = None,
    local_address: str | None = None,
) -> WeightGroup:
    """Rendezvous ``world_size`` processes into a new standalone group.

    Rank 0 hosts the ``TCPStore`` on ``master_port``; every rank must call this concurrently
    with the same address, port, world size and ``group_name``. ``backend`` is ``"gloo"`` (CPU
    tensors) or ``"nccl"`` (CUDA tensors on ``device``, default the current CUDA device; untested
    here). ``local_address`` is the interface this rank's gloo transport binds to (default:
    loopback when the master is loopback, otherwise the host's default interface).
    ``timeout_s`` bounds the rendezvous and every later collective. Raises
    ``WeightSyncTimeout``/``WeightSyncError`` on failure; nothing is left running then.
    """
    try:
        master_port = int(master_port)  # callers pass it as a string too (JSON, CLI)
    except (TypeError, ValueError):
        raise ValueError(f"invalid master_port={master_port!r}: must be a port number") from None
    if not 0 < master_port < 65536:
        raise ValueError(f"invalid master_port={master_port}: must be in 1..65535")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of size {world_size}")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    check_timeout(timeout_s)
    timeout = datetime.timedelta(seconds=timeout_s)
    what = f"create_group({master_address}:{master_port}, {backend})"
    where = f"weight-sync group {group_name!r} (rank {rank}/{world_size})"
    try:
        store = dist.TCPStore(master_address, master_port, world_size, rank == 0, timeout=timeout)
        # The stock recipe's layout: PrefixStore(group_name), then _new_process_group_helper's
        # f"{group_name}/" and device-type prefixes (gloo runs on "cpu", NCCL on "cuda").
        named = dist.PrefixStore(f"{group_name}/", dist.PrefixStore(group_name, store))
        prefixed = dist.PrefixStore("cpu/" if backend == "gloo" else "cuda/", named)
        if backend == "gloo":
            dev = torch.device("cpu") if device is None else torch.device(device)
            pg = _gloo(prefixed, rank, world_size, timeout, master_address, local_address)
        else:
            dev = _cuda_device(device)
            pg = _nccl(prefixed, rank, world_size, timeout)
    except Exception as exc:
        cls = WeightSyncTimeout if _is_timeout(exc) else WeightSyncError
        raise cls(f"{where}: {what} failed: {exc}") from exc
    return WeightGroup(group_name, rank, world_size, backend, timeout_s, dev, pg, store)


def _gloo(
    store: Any,
    rank: int,
    world_size: int,
    timeout: datetime.timedelta,
    master_address: str,
    local_address: str | None,
) -> Any:
    gloo = dist.ProcessGroupGloo
    if local_address is None and master_address in _LOOPBACK:
        local_address = master_address
    if local_address is None:
        device = gloo.create_default_device()
    else:
        device = gloo.create_device(hostname=local_address)
    opts = gloo._Options()
    opts._devices = [device]
    opts._timeout = timeout
    return gloo(store, rank, world_size, opts)


def _cuda_device(device: torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda", torch.cuda.current_device())
    dev = torch.device(device)
    if dev.type != "cuda":
        raise ValueError(f"nccl needs a CUDA device, got {dev}")
    return dev


def _nccl(store: Any, rank: int, world_size: int, timeout: datetime.timedelta) -> Any:
    # Untested in this repository (no GPU in CI); mirrors the gloo construction.
    nccl = dist.ProcessGroupNCCL
    opts = nccl.Options()
    opts._timeout = timeout
    return nccl(store, rank, world_size, opts)
