"""Trainer-side helpers: turn a model into named tensors and push them to the engines.

Distributed path (trainer is rank 0 of a standalone group, engines are ranks 1..N)::

    from weight_sync import WeightSender, create_group, free_port, named_tensors_of
    from weight_sync import push_distributed

    port = free_port(host)
    refs = [e.init_group.remote(host, port, 1 + i, world, name) for i, e in enumerate(engines)]
    group = create_group(host, port, 0, world, name, "gloo", timeout_s=120)  # concurrent with refs
    sender = WeightSender(group)  # buckets: 64 MB over gloo, 512 MB on GPU
    ...
    # after every training step; one RPC per engine carries the plan (JSON string):
    def send_plan(plan):
        return [e.receive_weights.remote(plan.to_json()) for e in engines]   # must not block
    futures = push_distributed(sender, named_tensors_of(model), send_plan, weight_version=step)
    ray.get(futures)

    # (a WeightReceiver engine side wants push_distributed(..., merge_spans=False))
    # engine side: receiver = WeightReceiver(group) once, then per update (receive_weights):
    #   plan = UpdatePlan.from_json(plan_json)
    #   receiver.receive(plan, load_fn)            # load_fn copies each bucket's tensors, or
    #   engine.apply(receiver.iter_pairs(plan))    # owned tensors for validate-then-copy loaders

Colocated path (trainer and engine on the same host/GPU)::

    push_colocated(
        named_tensors_of(model),
        prefix=f"rlr-{engine_id}-{step}",
        apply_fn=lambda handles: ray.get(engine.load_colocated.remote(handles)),
    )
    # engine side (load_colocated): weight_sync.load_colocated(handles, load_fn), or
    #   engine.apply(weight_sync.iter_colocated(handles))   # views stay valid until dropped

``apply_fn`` must return only after every engine has copied the weights (that is the
acknowledgement); the shared buckets are released when it returns or raises. Refitting every
step, keep one ``SegmentPool`` and a fixed ``prefix`` (``push_colocated(..., pool=pool)``): the
segments are then reused instead of recreated (see ``weight_sync.colocated.SegmentPool``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

import torch

from weight_sync.bucket import ALIGN_BYTES, DEFAULT_BUCKET_BYTES, align_elements
from weight_sync.colocated import BucketHandle, ColocatedBuckets, SegmentPool
from weight_sync.sender import NamedTensors, WeightSender
from weight_sync.spec import UpdatePlan

T = TypeVar("T")

# Wrapper modules insert these path components in front of HF parameter names.
WRAPPER_PREFIXES = ("module", "_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def hf_name(name: str) -> str:
    """Strip DDP / torch.compile / FSDP1 / activation-checkpoint wrapper components."""
    return ".".join(part for part in name.split(".") if part not in WRAPPER_PREFIXES)


def named_tensors_of(
    source: torch.nn.Module | Mapping[str, torch.Tensor],
    dedupe_tied: bool = True,
) -> list[tuple[str, torch.Tensor]]:
    """``(hf_name, tensor)`` pairs to push: detached, contiguous, in state-dict order.

    For a module this is its ``state_dict`` (parameters and *persistent* buffers; non-persistent
    buffers such as rotary caches are skipped). With ``dedupe_tied`` a tensor that aliases an
    earlier one exactly (a tied LM head) is sent once, under its first name -- as HF saves it;
    the engine re-ties it. DTensor / sharded parameters must be gathered by the caller first.
    Raises ``TypeError`` for non-tensor values and ``ValueError`` if two names collide after
    stripping wrapper prefixes.
    """
    if isinstance(source, torch.nn.Module):
        items = source.state_dict(keep_vars=True).items()
    elif isinstance(source, Mapping):
        items = source.items()
    else:
        raise TypeError(f"expected an nn.Module or a state dict, got {type(source).__name__}")
    out: list[tuple[str, torch.Tensor]] = []
    seen: set[str] = set()
    aliases: set[tuple] = set()
    for raw_name, value in items:
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{raw_name}: expected a tensor, got {type(value).__name__}")
        name = hf_name(raw_name)
        if name in seen:
            raise ValueError(f"two entries map to the name {name!r}")
        seen.add(name)
        alias = _alias_key(value)
        if dedupe_tied and alias is not None:
            if alias in aliases:
                continue  # a tied weight: the engine ties it again from the first name
            aliases.add(alias)
        out.append((name, value.detach().contiguous()))
    return out


def _alias_key(t: torch.Tensor) -> tuple | None:
    if t.numel() == 0:
        return None
    storage = t.untyped_storage().data_ptr()
    return (t.device, storage, t.storage_offset(), t.dtype, t.shape, t.stride())


def flatten_parameters(module: torch.nn.Module) -> dict[torch.dtype, torch.Tensor]:
    """Move ``module``'s parameters and persistent buffers into one flat buffer per dtype, in
    :func:`named_tensors_of` order, and return the buffers.

    Every tensor keeps its identity (``tensor.data`` is rebound to a view of the buffer), so
    optimizers and hooks made before or after keep working, and in-place updates land in the
    buffer. ``WeightSender`` then sends each bucket straight from that memory instead of
    packing it (the bucket layout is the buffer's layout). Call once, before training; new
    parameters added later are not moved. Values are preserved.
    """
    objects: dict[str, torch.Tensor] = {}
    for raw_name, value in module.state_dict(keep_vars=True).items():
        objects.setdefault(hf_name(raw_name), value)
    named = named_tensors_of(module)
    # The plan's layout: each tensor on an ALIGN_BYTES boundary of its dtype's buffer.
    starts: list[int] = []
    ends: dict[torch.dtype, int] = {}
    for _, t in named:
        start = align_elements(ends.get(t.dtype, 0), t.dtype)
        starts.append(start)
        ends[t.dtype] = start + t.numel()
    device = named[0][1].device if named else torch.device("cpu")
    flats = {dt: _aligned_empty(n, dt, device) for dt, n in ends.items()}
    with torch.no_grad():
        for (name, t), start in zip(named, starts):
            if t.device != device:
                raise ValueError(f"{name} is on {t.device}, the others on {device}")
            view = flats[t.dtype][start : start + t.numel()].view(t.shape)
            view.copy_(t)
            objects[name].data = view
    return flats


def _aligned_empty(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A 1-D tensor whose first element sits on an ``ALIGN_BYTES`` boundary."""
    slack = ALIGN_BYTES // torch.empty(0, dtype=dtype).element_size()
    raw = torch.zeros(numel + slack, dtype=dtype, device=device)  # gaps go on the wire: zeros
    skip = (-raw.data_ptr() % ALIGN_BYTES) // raw.element_size()
    return raw[skip : skip + numel]


def push_distributed(
    sender: WeightSender,
    named: NamedTensors,
    send_plan_fn: Callable[[UpdatePlan], T],
    weight_version: int | str = 0,
    merge_spans: bool = True,
) -> T:
    """Plan, ship the plan with ONE call of ``send_plan_fn``, then stream the buckets.

    ``send_plan_fn(plan)`` must start the engines' :func:`~weight_sync.receiver.receive` and
    return without waiting for it (e.g. return Ray object refs); waiting there deadlocks until
    the timeout. Its return value is returned so the caller can wait for the engines' ack.
    ``merge_spans`` (see ``WeightSender.plan``): pass False when the engines stream bucket by
    bucket through a ``WeightReceiver`` (merged spans would need receive slots that large).
    """
    named = list(named.items()) if isinstance(named, Mapping) else list(named)
    plan = sender.plan(named, weight_version, merge_spans=merge_spans)
    pending = send_plan_fn(plan)
    sender.send(named, plan)
    return pending


def push_colocated(
    named: NamedTensors,
    prefix: str,
    apply_fn: Callable[[list[BucketHandle]], T],
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    weight_version: int | str = 0,
    pool: SegmentPool | None = None,
) -> T:
    """Share ``named`` as buckets, call ``apply_fn(handles)`` (blocking until every engine has
    loaded = ack), then release the buckets, also if ``apply_fn`` raises. With ``pool`` (keep
    one for the whole run, same ``prefix`` each time) the segments are reused, not recreated."""
    with ColocatedBuckets(named, prefix, bucket_bytes, weight_version, pool=pool) as buckets:
        return apply_fn(buckets.handles)
