"""Degree-k diffuse: process groups, input broadcast, context/CFG parallel transformer.

The family adapters call exactly two seams (both are no-ops at degree 1)::

    inputs = broadcast_inputs(inputs, parallel)          # rank>0 passes None
    with diffuse_context(pipe, meta, parallel):          # no-op when parallel is None
        latents = pipe(..., output_type="latent")

and the worker runtime brackets an instance's tasks with :func:`join_group` /
:func:`leave_group`. See ``docs/parallelism.md`` for the design and the measurements.

Groups. A worker is in at most one instance at a time, so while it is in one the
instance's group *is* the process's default (WORLD) group: ``join_group`` calls
``torch.distributed.init_process_group`` on a :class:`~torch.distributed.PrefixStore`
named after the group key, ``leave_group`` calls ``destroy_process_group`` (which also
frees every sub-group diffusers built for its device mesh). diffusers' context
parallelism reads the default group (``get_rank()``, ``init_device_mesh``), so this is
also what it needs. A new formation needs a new group key; keys are never reused.

Store. ``rendezvous`` is ``"tcp://HOST:PORT"`` of a torch ``TCPStore``. Recommended:
every worker calls :func:`host_store` once at start-up and reports the address; an
instance uses its rank-0 worker's address. A store that outlives formations avoids
choosing a free port per formation, and a restarted worker simply hosts a new store
(new address) and joins new formations under new keys. If rank 0 does not host the
address yet, it starts hosting it there (on that port, for the rest of its life).

One model, many degrees. ``diffusers``' ``enable_parallelism`` may be applied once per
model object, but one worker's diffuse weights serve degree 1 now and degree 4 with
other partners next. The context-parallel path therefore enables parallelism on a
*shallow clone* of the transformer (a new module tree whose parameters and buffers
are the very same tensors), made once per (formation, transformer) and dropped by
``leave_group``; ``pipe.transformer`` points at the clone only inside
``diffuse_context``. The model the worker loaded is never modified (the CFG path only
shadows its ``forward`` for the duration of the block).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from trident.pipelines.api import ModelMeta, ParallelContext

if TYPE_CHECKING:
    import torch

__all__ = [
    "AgreedCancel",
    "broadcast_inputs",
    "diffuse_context",
    "host_store",
    "join_group",
    "leave_group",
    "parallel_mode",
]

DEFAULT_TIMEOUT_S = 60.0
_CONTAINERS = (dict, OrderedDict, list, set)
_KEY_PREFIX = "trident/pg/"


# --------------------------------------------------------------------------- stores


@dataclass
class _GroupState:
    ctx: ParallelContext
    group_key: str
    store: Any  # the TCPStore (kept alive for the group's lifetime)
    # (id(transformer), ulysses degree) -> (transformer, its parallel clone)
    clones: dict[tuple[int, int], tuple[Any, Any]] = field(default_factory=dict)


_LOCK = threading.Lock()
_HOSTED: dict[str, Any] = {}  # rendezvous address -> TCPStore hosted by this process
_CLIENTS: dict[str, Any] = {}  # rendezvous address -> TCPStore client (reused)
_GROUPS: dict[int, _GroupState] = {}  # id(ParallelContext) -> state


def _parse_rendezvous(rendezvous: str) -> tuple[str, int]:
    parts = urlsplit(rendezvous)
    if parts.scheme != "tcp" or not parts.hostname or parts.port is None:
        raise ValueError(f"rendezvous must look like 'tcp://HOST:PORT', got {rendezvous!r}")
    return parts.hostname, parts.port


def _format_rendezvous(host: str, port: int) -> str:
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def host_store(
    host: str = "127.0.0.1", port: int = 0, *, timeout: float = DEFAULT_TIMEOUT_S
) -> str:
    """Host a long-lived rendezvous store in this process; returns its ``tcp://`` address.

    A worker calls this once at start-up (``port=0`` lets the OS choose) and reports the
    address; formations whose rank 0 is this worker use it as ``rendezvous``. Calling it
    again with the same address returns the existing store's address.
    """
    from torch.distributed import TCPStore

    with _LOCK:
        if port:
            addr = _format_rendezvous(host, port)
            if addr in _HOSTED:
                return addr
        store = TCPStore(
            host,
            port,
            is_master=True,
            wait_for_workers=False,
            timeout=timedelta(seconds=timeout),
        )
        addr = _format_rendezvous(host, store.port)
        _HOSTED[addr] = store
        return addr


def _open_store(
    rendezvous: str, rank: int, world_size: int, host: bool | None, timeout: float
) -> Any:
    from torch.distributed import TCPStore

    hostname, port = _parse_rendezvous(rendezvous)
    addr = _format_rendezvous(hostname, port)
    with _LOCK:
        hosted = _HOSTED.get(addr)
    if hosted is not None:
        return hosted
    if host or (host is None and rank == 0):
        # Host it now, for the life of the process: a store freed after each formation
        # leaves its port in use for a while and the next formation could not bind it.
        host_store(hostname, port, timeout=timeout)
        with _LOCK:
            return _HOSTED[addr]
    # One client per address, reused across formations (keys are namespaced per group):
    # a fresh TCPStore client per formation sometimes stalls 5 s in its connect on
    # loopback (measured, docs/parallelism.md). A client whose server went away (that
    # worker restarted) fails its probe and is replaced.
    with _LOCK:
        client = _CLIENTS.get(addr)
    if client is not None:
        try:
            client.check(["trident/alive"])
            return client
        except Exception:
            with _LOCK:
                _CLIENTS.pop(addr, None)
    client = TCPStore(hostname, port, None, is_master=False, timeout=timedelta(seconds=timeout))
    with _LOCK:
        _CLIENTS[addr] = client
    return client


# --------------------------------------------------------------------------- groups


def join_group(
    rendezvous: str,
    group_key: str,
    rank: int,
    world_size: int,
    backend: str = "gloo",
    *,
    host: bool | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> ParallelContext:
    """Join the process group ``group_key`` of ``world_size`` ranks; blocks until all joined.

    ``rendezvous`` is ``"tcp://HOST:PORT"`` of a torch ``TCPStore``. If this process
    hosts it (:func:`host_store`) it is used; otherwise rank 0 starts hosting it on
    that port (and keeps it for later formations) and the other ranks connect as
    clients. ``host=False`` makes rank 0 a client too (store hosted by another process,
    e.g. the node daemon); ``host=True`` makes any rank host it. ``group_key`` must be
    new for every formation (e.g. instance id + formation counter): it namespaces the
    store's keys, so a restarted partner never meets a stale half-formed group.

    ``backend``: ``"gloo"`` for CPU workers, ``"nccl"`` for CUDA workers (each worker
    must already have its GPU selected, e.g. ``CUDA_VISIBLE_DEVICES`` or
    ``torch.cuda.set_device``). ``timeout`` bounds the rendezvous and every collective.
    """
    import torch.distributed as dist

    if world_size < 2:
        raise ValueError(f"a group needs world_size >= 2 (degree 1 needs none), got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    if not group_key or "/" in group_key:
        raise ValueError(f"group_key must be a non-empty string without '/', got {group_key!r}")
    if dist.is_initialized():
        raise RuntimeError(
            "this process is already in a process group: leave_group() it before joining another"
        )
    store = _open_store(rendezvous, rank, world_size, host, timeout)
    prefixed = dist.PrefixStore(f"{_KEY_PREFIX}{group_key}/", store)
    dist.init_process_group(
        backend,
        store=prefixed,
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout),
    )
    group = dist.group.WORLD
    ctx = ParallelContext(rank=rank, world_size=world_size, group=group, backend=backend)
    with _LOCK:
        _GROUPS[id(ctx)] = _GroupState(ctx=ctx, group_key=group_key, store=store)
    return ctx


def leave_group(ctx: ParallelContext) -> None:
    """Tear down ``ctx``'s group (and every sub-group made for it); idempotent.

    Local only (no collective), so it is safe after a partner died. Drops the parallel
    model clones made for this group; a store hosted by this process stays up.
    """
    import torch.distributed as dist

    with _LOCK:
        state = _GROUPS.pop(id(ctx), None)
    if state is None or state.ctx is not ctx:
        return
    state.clones.clear()
    if dist.is_initialized():
        dist.destroy_process_group()
    state.store = None


def _state(ctx: ParallelContext) -> _GroupState:
    with _LOCK:
        state = _GROUPS.get(id(ctx))
    if state is None or state.ctx is not ctx:
        raise RuntimeError("ParallelContext is not a live group of this process (join_group first)")
    return state


# --------------------------------------------------------------------------- inputs


def _comm_device(parallel: ParallelContext) -> torch.device:
    import torch

    if parallel.backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_inputs(
    inputs: Mapping[str, torch.Tensor] | None, parallel: ParallelContext | None
) -> dict[str, torch.Tensor]:
    """Give every rank rank 0's ``inputs`` (ranks > 0 pass ``None``; what they pass is ignored).

    Metadata (names, dtypes, shapes) goes first with ``broadcast_object_list``, then one
    ``broadcast`` per tensor. Tensors come back on the communication device (CPU for
    gloo, the current GPU for nccl); rank 0 gets its own tensors back when they are
    already there.
    """
    import torch
    import torch.distributed as dist

    if parallel is None:
        if inputs is None:
            raise ValueError("degree 1: inputs are required")
        return dict(inputs)
    group = parallel.group
    device = _comm_device(parallel)
    header: list[Any]
    if parallel.rank == 0:
        if inputs is None:
            raise ValueError("rank 0 must pass the inputs")
        tensors = {}
        for name, value in inputs.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"input {name!r} is {type(value).__name__}, not a tensor")
            tensors[name] = value.to(device).contiguous()
        header = [
            [
                (name, str(t.dtype).removeprefix("torch."), list(t.shape))
                for name, t in tensors.items()
            ]
        ]
        dist.broadcast_object_list(header, src=0, group=group)
    else:
        header = [None]
        dist.broadcast_object_list(header, src=0, group=group)
        tensors = {
            name: torch.empty(shape, dtype=getattr(torch, dtype), device=device)
            for name, dtype, shape in header[0]
        }
    for t in tensors.values():
        if t.numel():
            dist.broadcast(t, src=0, group=group)
    return tensors


# --------------------------------------------------------------------------- cancel


class AgreedCancel(threading.Event):
    """A cancel flag that every rank of a degree-k group reads the same way.

    A cancel reaches the ranks' workers at different moments; a rank that stopped at
    step 3 while its partners went on to step 4 would leave them blocked in the next
    collective. Here :meth:`is_set` is itself a collective (an all-reduce of the local
    flags with MAX), so all ranks see "set" at the same check and stop together. Every
    rank must therefore call :meth:`is_set` / :meth:`poll` the same number of times: the
    diffuse stage checks once before it starts and polls once after every denoising
    step, on every rank.
    """

    def __init__(self, local: threading.Event | None, parallel: ParallelContext) -> None:
        super().__init__()
        self._local = local
        self._parallel = parallel

    def set(self) -> None:
        if self._local is not None:
            self._local.set()

    def report_step(self, step: int, total: int) -> None:
        """Progress goes to the local flag's reporter (only rank 0's worker has one);
        no collective: ranks need not agree on it."""
        report = getattr(self._local, "report_step", None)
        if report is not None:
            report(step, total)

    def is_set(self) -> bool:
        return self._agree(self._local is not None and self._local.is_set(), False)[0]

    def poll(self) -> tuple[bool, bool]:
        """(cancel, yield), agreed in one collective: a yield that reaches one rank's
        worker stops every rank after the same step (the step-end check)."""
        local = self._local
        if local is None:
            return self._agree(False, False)
        poll = getattr(local, "poll", None)
        cancel, yield_now = poll() if poll is not None else (local.is_set(), False)
        return self._agree(bool(cancel), bool(yield_now))

    def _agree(self, cancel: bool, yield_now: bool) -> tuple[bool, bool]:
        import torch
        import torch.distributed as dist

        flags = torch.tensor(
            [int(cancel), int(yield_now)], dtype=torch.int32, device=_comm_device(self._parallel)
        )
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._parallel.group)
        return bool(flags[0].item()), bool(flags[1].item())


# --------------------------------------------------------------------------- diffuse


def parallel_mode(pipe: Any, meta: ModelMeta) -> str:
    """``"context"`` (diffusers ``_cp_plan``: Ulysses over the sequence), ``"cfg"``
    (cond/uncond halves of the batch on separate ranks), or ``"none"`` (no degree > 1)."""
    transformer = getattr(pipe, "transformer", None)
    if transformer is not None and getattr(transformer, "_cp_plan", None):
        return "context"
    if meta.uses_cfg:
        return "cfg"
    return "none"


@contextlib.contextmanager
def _cpu_device_count_shim(device_type: str) -> Iterator[None]:
    """diffusers 0.42 computes ``rank % torch.accelerator.device_count()`` in
    ``enable_parallelism``; with no accelerator that is ``x % 0``. On CPU only, make
    that one call return 1 for the duration of the block."""
    import torch

    if device_type != "cpu" or torch.accelerator.device_count() > 0:
        yield
        return
    original = torch.accelerator.device_count

    def one() -> int:
        return 1

    torch.accelerator.device_count = one
    try:
        yield
    finally:
        torch.accelerator.device_count = original


def _shared_clone(module: torch.nn.Module) -> torch.nn.Module:
    """A new module tree over the very same parameter and buffer tensors (no weight copy).

    Every module object is copied shallowly, with its own containers (sub-modules,
    parameter / buffer / hook dicts) and its own attention processor, so that what
    ``enable_parallelism`` attaches to the clone never reaches the original. A tree
    carrying diffusers hooks (``_diffusers_hook``, e.g. caches) is deep-copied instead
    (slower, same sharing), since those hooks hold references to their module.
    """
    if any(hasattr(m, "_diffusers_hook") for m in module.modules()):
        memo: dict[int, Any] = {
            id(t): t for t in itertools.chain(module.parameters(), module.buffers())
        }
        return copy.deepcopy(module, memo)
    return _clone_tree(module, {})


def _clone_tree(module: Any, done: dict[int, Any]) -> Any:
    if id(module) in done:  # a module shared within the tree stays shared in the clone
        return done[id(module)]
    # object.__new__ + __dict__ copy: ~10x faster than copy.copy (nn.Module.__setstate__).
    clone = object.__new__(type(module))
    done[id(module)] = clone
    state = clone.__dict__
    for name, value in module.__dict__.items():
        # Own copies of nn.Module's containers (hooks, parameter / buffer dicts); exact
        # types only: diffusers' FrozenDict config is immutable and stays shared.
        state[name] = value.copy() if type(value) in _CONTAINERS else value
    state["_modules"] = {
        name: None if sub is None else _clone_tree(sub, done)
        for name, sub in module._modules.items()
    }
    processor = state.get("processor")  # a plain-object attention processor
    if processor is not None:
        state["processor"] = copy.copy(processor)
    return clone


def _context_parallel_model(transformer: Any, parallel: ParallelContext) -> Any:
    """The clone of ``transformer`` with diffusers' Ulysses CP over ``parallel`` (cached)."""
    from diffusers import ContextParallelConfig
    from torch.distributed.device_mesh import init_device_mesh

    state = _state(parallel)
    key = (id(transformer), parallel.world_size)
    cached = state.clones.get(key)
    if cached is not None and cached[0] is transformer:
        return cached[1]
    device_type = transformer.device.type
    clone: Any = _shared_clone(transformer)
    mesh = init_device_mesh(
        device_type, (1, parallel.world_size), mesh_dim_names=("ring", "ulysses")
    )
    config = ContextParallelConfig(ulysses_degree=parallel.world_size, mesh=mesh)
    with _cpu_device_count_shim(device_type):
        clone.enable_parallelism(config=config)
    state.clones[key] = (transformer, clone)
    return clone


def _batch_parallel_forward(
    forward: Callable[..., Any], parallel: ParallelContext, family: str
) -> Callable[..., Any]:
    """Wrap a transformer ``forward``: run this rank's 1/k of the batch, all-gather."""
    import torch
    import torch.distributed as dist

    k, rank, group = parallel.world_size, parallel.rank, parallel.group

    def gather(t: torch.Tensor) -> torch.Tensor:
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(k)]
        dist.all_gather(parts, t, group=group)
        return torch.cat(parts, dim=0)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        batch = int(hidden.shape[0])
        if batch % k:
            raise RuntimeError(
                f"{family}: degree {k} splits the batch (classifier-free guidance's "
                f"cond/uncond halves) across ranks, but this call has batch {batch}; "
                "run it at degree 1 or with guidance (guidance_scale > 1)"
            )
        n = batch // k
        lo, hi = rank * n, (rank + 1) * n

        def cut(x: Any) -> Any:
            if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == batch:
                return x[lo:hi]
            return x

        out = forward(*(cut(a) for a in args), **{name: cut(v) for name, v in kwargs.items()})

        def join(x: Any) -> Any:
            if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == n:
                return gather(x)
            return x

        if isinstance(out, torch.Tensor):
            return join(out)
        if isinstance(out, tuple):
            return tuple(join(x) for x in out)
        if isinstance(out, dict):  # diffusers BaseOutput is an OrderedDict
            for name in list(out.keys()):
                out[name] = join(out[name])
            return out
        raise TypeError(f"{family}: unexpected transformer output {type(out).__name__}")

    return wrapped


@contextlib.contextmanager
def diffuse_context(pipe: Any, meta: ModelMeta, parallel: ParallelContext | None) -> Iterator[None]:
    """Run ``pipe``'s denoiser at the degree of ``parallel`` inside the block.

    - families with a diffusers ``_cp_plan`` (flux, wan, ...): Ulysses context
      parallelism (``enable_parallelism(ContextParallelConfig(ulysses_degree=k))``) on a
      weight-sharing clone of ``pipe.transformer``, swapped in for the block;
    - other families using CFG (sd3, cogvideox): each rank runs its 1/k of the batch
      (k=2: the cond or the uncond half) and the outputs are all-gathered;
    - otherwise ``ValueError``: the planner must not choose k > 1 there.

    Every rank must enter with the same arguments; on exit ``pipe`` is as it was.
    """
    if parallel is None or parallel.world_size == 1:
        yield
        return
    mode = parallel_mode(pipe, meta)
    transformer = getattr(pipe, "transformer", None)
    if transformer is None or mode == "none":
        raise ValueError(
            f"{meta.family}: degree {parallel.world_size} is not supported: its transformer "
            "has no context-parallel plan in diffusers and it does not use classifier-free "
            "guidance; run it at degree 1"
        )
    if mode == "context":
        clone = _context_parallel_model(transformer, parallel)
        pipe.transformer = clone
        try:
            yield
        finally:
            pipe.transformer = transformer
        return
    # CFG / batch parallel: shadow forward on the instance, restore afterwards.
    had_own = "forward" in transformer.__dict__
    own = transformer.__dict__.get("forward")
    transformer.forward = _batch_parallel_forward(transformer.forward, parallel, meta.family)
    try:
        yield
    finally:
        if had_own:
            transformer.forward = own
        else:
            del transformer.forward
