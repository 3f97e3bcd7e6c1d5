"""Weight sync: learner rank 0 streams HF-named tensors, bucket by bucket, into every vLLM engine.

One small interface, one class per transport:
- ``gloo``: a stateless process group (TCPStore + PrefixStore + ProcessGroupGloo) of learner rank 0 and
  every engine, separate from DeepSpeed's and vLLM's own groups. The CPU default; mirrors NCCL's topology.
- ``nccl``: the same stateless group with ProcessGroupNCCL and CUDA buffers (the GPU default).
- ``object_store``: each bucket is one flat uint8 numpy array in Ray's object store (zero-copy reads; never
  pickled torch tensors, which are ~5x slower).

Buckets are flat byte buffers: any dtype (bf16 included) is viewed as uint8, so one broadcast moves a bucket.
Layouts travel through the group's TCPStore (or with the object refs), not through the controller.
Receivers collect every bucket before loading anything: a sync that fails part-way leaves the engine on
its previous, complete version (the error names it; the run stops), never half-loaded.
Every wait carries ``timeout_s``: a dead peer is an error, never a hang.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch

NamedTensors = list[tuple[str, torch.Tensor]]
_END = "end"  # layout value that marks the last bucket
_ALIGN = 16  # bytes; every tensor starts at a multiple of this inside a bucket
_ABORT = "abort"  # layout value a failing sender leaves so receivers stop waiting


class SyncError(RuntimeError):
    """A weight sync failed; the message names the engine / rank and the phase."""


# --------------------------------------------------------------------------------- bucket layout
@dataclass(frozen=True)
class TensorMeta:
    """Where one tensor lives inside a flat bucket."""

    name: str
    dtype: str  # e.g. "float32", "bfloat16"
    shape: tuple[int, ...]
    offset: int  # bytes from the start of the bucket
    nbytes: int


def pack_bucket(tensors: NamedTensors) -> tuple[torch.Tensor, list[TensorMeta]]:
    """Concatenate tensors into one flat uint8 buffer (on their device) and describe the layout."""
    metas: list[TensorMeta] = []
    parts: list[torch.Tensor] = []
    offset = 0
    for name, t in tensors:
        flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
        pad = -offset % _ALIGN  # typed views need offsets divisible by the element size
        if pad:
            parts.append(torch.zeros(pad, dtype=torch.uint8, device=flat.device))
            offset += pad
        metas.append(TensorMeta(name, str(t.dtype).removeprefix("torch."), tuple(t.shape), offset, flat.numel()))
        parts.append(flat)
        offset += flat.numel()
    buffer = torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)
    return buffer, metas


def unpack_bucket(buffer: torch.Tensor, metas: list[TensorMeta]) -> NamedTensors:
    """Views into ``buffer`` with each tensor's dtype and shape (no copies)."""
    out: NamedTensors = []
    for m in metas:
        raw = buffer[m.offset : m.offset + m.nbytes]
        out.append((m.name, raw.view(getattr(torch, m.dtype)).reshape(m.shape)))
    return out


def rebucket(tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[NamedTensors]:
    """Group a stream of named tensors into buckets of at most ``bucket_bytes`` (a larger tensor goes alone)."""
    bucket: NamedTensors = []
    size = 0
    for name, t in tensors:
        n = t.numel() * t.element_size()
        if bucket and size + n > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += n
    if bucket:
        yield bucket


def _metas_to_json(metas: list[TensorMeta]) -> str:
    return json.dumps([[m.name, m.dtype, list(m.shape), m.offset, m.nbytes] for m in metas])


def _metas_from_json(text: str | bytes) -> list[TensorMeta]:
    return [TensorMeta(n, d, tuple(s), o, b) for n, d, s, o, b in json.loads(text)]


# ------------------------------------------------------------------------------------- timings
@dataclass
class SyncTimings:
    """Seconds spent per phase on one side of a sync, and bytes moved."""

    gather_s: float = 0.0  # sender: ZeRO-3 gather / export
    transfer_s: float = 0.0  # moving bytes
    load_s: float = 0.0  # receiver: reload_weights + reset_prefix_cache
    num_bytes: int = 0
    num_buckets: int = 0

    def as_metrics(self, prefix: str) -> dict[str, float]:
        """Namespaced metrics, e.g. ``sync/transfer_s``."""
        return {f"{prefix}/{k}": float(v) for k, v in self.__dict__.items()}


# ------------------------------------------------------------------------------ stateless groups
@dataclass(frozen=True)
class GroupSpec:
    """How to join one sync's stateless group. Rank 0 is the sender (learner rank 0)."""

    transport: str  # "gloo" | "nccl"
    host: str
    port: int
    world_size: int  # 1 + number of engines
    version: int  # weight version being synced; also the store prefix
    timeout_s: float


class StatelessGroupTransport:
    """Broadcast buckets over a process group independent of the default one (gloo or NCCL)."""

    def __init__(self, spec: GroupSpec, rank: int, store: torch.distributed.TCPStore | None = None) -> None:
        if spec.transport == "nccl" and not (torch.cuda.is_available() and torch.distributed.is_nccl_available()):
            raise SyncError(f"sync v{spec.version} rank {rank}: transport 'nccl' needs CUDA torch with NCCL on every "
                            "peer; use sync.transport=gloo or object_store on CPU")
        timeout = timedelta(seconds=spec.timeout_s)
        if store is None:
            store = torch.distributed.TCPStore(spec.host, spec.port, spec.world_size, is_master=False,
                                               timeout=timeout)
        self.spec, self.rank = spec, rank
        self.store = torch.distributed.PrefixStore(f"cai-ray-sync/v{spec.version}", store)
        if spec.transport == "nccl":
            from torch.distributed import ProcessGroupNCCL

            opts = ProcessGroupNCCL.Options()
            opts._timeout = timeout
            self.group = ProcessGroupNCCL(self.store, rank, spec.world_size, opts)
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            from torch.distributed import ProcessGroupGloo

            self.group = ProcessGroupGloo(self.store, rank, spec.world_size, timeout)
            self.device = torch.device("cpu")

    def _broadcast(self, buffer: torch.Tensor) -> None:
        opts = torch.distributed.BroadcastOptions()
        opts.rootRank = 0
        opts.timeout = timedelta(seconds=self.spec.timeout_s)
        self.group.broadcast([buffer], opts).wait(timedelta(seconds=self.spec.timeout_s))

    def send(self, buckets: Iterable[NamedTensors]) -> SyncTimings:
        """Rank 0: publish each bucket's layout in the store, then broadcast its bytes."""
        timings = SyncTimings()
        try:
            self._send(buckets, timings)
        except Exception:
            # Tell receivers still waiting for a layout to give up now rather than at their timeout.
            self.store.set(f"bucket/{timings.num_buckets}", _ABORT)
            raise
        return timings

    def _send(self, buckets: Iterable[NamedTensors], timings: SyncTimings) -> None:
        it = iter(buckets)
        while True:
            t0 = time.perf_counter()
            bucket = next(it, None)
            timings.gather_s += time.perf_counter() - t0
            t1 = time.perf_counter()
            if bucket is None:
                self.store.set(f"bucket/{timings.num_buckets}", _END)
                self.group.barrier().wait(timedelta(seconds=self.spec.timeout_s))
                timings.transfer_s += time.perf_counter() - t1
                return
            buffer, metas = pack_bucket(bucket)
            self.store.set(f"bucket/{timings.num_buckets}", _metas_to_json(metas))
            self._broadcast(buffer.to(self.device))
            timings.transfer_s += time.perf_counter() - t1
            timings.num_bytes += buffer.numel()
            timings.num_buckets += 1

    def receive(self) -> tuple[NamedTensors, SyncTimings]:
        """Engine ranks: receive every bucket (CPU tensors); nothing is loaded here."""
        timings = SyncTimings()
        received: NamedTensors = []
        t0 = time.perf_counter()
        index = 0
        while True:
            layout = self.store.get(f"bucket/{index}")  # blocks until the sender publishes it (store timeout)
            if layout == _END.encode():
                break
            if layout == _ABORT.encode():
                raise SyncError(f"sync v{self.spec.version}: the sender aborted after {index} buckets")
            metas = _metas_from_json(layout)
            nbytes = metas[-1].offset + metas[-1].nbytes if metas else 0
            buffer = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            self._broadcast(buffer)
            received += unpack_bucket(buffer.cpu() if buffer.is_cuda else buffer, metas)
            timings.num_bytes += nbytes
            index += 1
        self.group.barrier().wait(timedelta(seconds=self.spec.timeout_s))
        timings.transfer_s = time.perf_counter() - t0
        timings.num_buckets = index
        return received, timings


# ---------------------------------------------------------------------------------- object store
@dataclass(frozen=True)
class ObjectStoreBucket:
    """One bucket in Ray's object store: a ref to a flat uint8 numpy array and its layout."""

    ref: Any  # ray.ObjectRef
    metas: tuple[TensorMeta, ...] = field(default_factory=tuple)


def object_store_send(buckets: Iterable[NamedTensors]) -> tuple[list[ObjectStoreBucket], SyncTimings]:
    """Sender: put each bucket as one numpy byte array (zero-copy on the reader's side)."""
    import ray

    timings = SyncTimings()
    out: list[ObjectStoreBucket] = []
    it = iter(buckets)
    while True:
        t0 = time.perf_counter()
        bucket = next(it, None)
        timings.gather_s += time.perf_counter() - t0
        if bucket is None:
            return out, timings
        t1 = time.perf_counter()
        buffer, metas = pack_bucket([(n, t.cpu()) for n, t in bucket])
        out.append(ObjectStoreBucket(ray.put(buffer.numpy()), tuple(metas)))
        timings.transfer_s += time.perf_counter() - t1
        timings.num_bytes += buffer.numel()
        timings.num_buckets += 1


def object_store_receive(buckets: list[ObjectStoreBucket], timeout_s: float) -> tuple[NamedTensors, SyncTimings]:
    """Receiver: fetch every bucket and view it as tensors."""
    import ray

    timings = SyncTimings()
    t0 = time.perf_counter()
    arrays = ray.get([b.ref for b in buckets], timeout=timeout_s)
    received: NamedTensors = []
    for array, bucket in zip(arrays, buckets, strict=True):
        # Zero-copy view of read-only shared memory; loading only reads it, so silence torch's warning.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.from_numpy(array)
        received += unpack_bucket(flat, list(bucket.metas))
        timings.num_bytes += array.nbytes
    timings.transfer_s = time.perf_counter() - t0
    timings.num_buckets = len(buckets)
    return received, timings


# ------------------------------------------------------------------------------- controller side
def receive_into(engine: Any, spec: GroupSpec, rank: int) -> SyncTimings:
    """Engine actor side of a group sync: receive every bucket, then load them all at once."""
    named, timings = StatelessGroupTransport(spec, rank).receive()
    t0 = time.perf_counter()
    engine.load_weights(named, spec.version)
    timings.load_s = time.perf_counter() - t0
    return timings


def receive_from_object_store(engine: Any, buckets: list[ObjectStoreBucket], version: int,
                              timeout_s: float) -> SyncTimings:
    """Engine actor side of an object-store sync."""
    named, timings = object_store_receive(buckets, timeout_s)
    t0 = time.perf_counter()
    engine.load_weights(named, version)
    timings.load_s = time.perf_counter() - t0
    return timings


class WeightSync:
    """Pushes the learner's policy into named engine actors with ``transport``.

    The transport is decided from the learner's and the engines' resources (never from the driver's
    hardware): see :func:`cai_ray.backend.resolve_sync_transport`.

    Learner ranks expose ``open_sync_store``, ``send_weights(spec, bucket_bytes)`` and
    ``put_weights(bucket_bytes)``; engines expose ``receive_weights(spec, rank)``,
    ``receive_weights_object_store(buckets, version)`` and ``weight_version()``.
    """

    def __init__(self, cfg: Any, learner: Any, targets: list[tuple[str, Any]], *, transport: str,
                 grace: Any) -> None:
        if transport not in ("gloo", "nccl", "object_store"):
            raise ValueError(f"WeightSync: transport {transport!r} must be resolved first (gloo, nccl or "
                             "object_store; ExperimentConfig.resolved_sync_transport() resolves 'auto')")
        self.cfg = cfg
        self.learner = learner
        self.targets = dict(targets)
        self.transport = transport
        self.bucket_bytes = cfg.bucket_size_mb << 20
        self.grace = grace  # a Deadline (cluster.control_timeout_s): how long past sync.timeout_s the driver waits

    def push(self, version: int, only: list[str] | None = None) -> dict[str, float]:
        """Sync ``version`` into every target (or ``only`` these); raises :class:`SyncError` naming engines."""
        from cai_ray import launcher

        names = only or list(self.targets)
        engines = [self.targets[n] for n in names]
        ranks = self.learner.actors
        t0 = time.perf_counter()
        try:
            if self.transport == "object_store":
                refs = [r.put_weights.remote(self.bucket_bytes) for r in ranks]
                sent = launcher.get_all(refs, timeout=self.cfg.deadline,
                                        names=[f"learner rank {i}: put_weights" for i in range(len(ranks))])
                buckets, sender = sent[0]
                got = launcher.get_all([e.receive_weights_object_store.remote(buckets, version, self.cfg.timeout_s)
                                        for e in engines],
                                       timeout=self.cfg.deadline, names=[f"{n}: receive_weights" for n in names])
            else:
                host, port = launcher.get(ranks[0].open_sync_store.remote(len(engines) + 1, self.cfg.timeout_s),
                                          timeout=self.cfg.deadline, what="learner rank 0: open_sync_store")
                spec = GroupSpec(self.transport, host, port, len(engines) + 1, version, self.cfg.timeout_s)
                send = [r.send_weights.remote(spec, self.bucket_bytes) for r in ranks]
                recv = [e.receive_weights.remote(spec, i + 1) for i, e in enumerate(engines)]
                # The grace lets the group's own timeouts fire first, so the error says which peer failed.
                results = launcher.get_all(send + recv, timeout=self.cfg.deadline,
                                           left_s=self.cfg.timeout_s + self.grace.seconds,
                                           names=[f"learner rank {i}: send_weights" for i in range(len(ranks))]
                                           + [f"{n}: receive_weights" for n in names])
                sender, got = results[0], results[len(ranks):]
        except launcher.RemoteCallError as err:
            # Names in err.failed are "<engine>: <call>"; a sender failure leaves every engine behind.
            failed = [n for n in names if any(f.startswith(f"{n}:") for f in err.failed)] or names
            raise SyncError(f"weight sync to version {version} failed ({self.transport}): {err}. Engines "
                            f"{failed} keep their previous complete weights") from err
        if self.transport == "object_store":
            # put() returns before anyone reads: the transfer ends when the slowest engine has its bytes.
            sender.transfer_s += max((t.transfer_s for t in got), default=0.0)
        sender.load_s = max((t.load_s for t in got), default=0.0)
        metrics = sender.as_metrics("sync") | {"sync/total_s": time.perf_counter() - t0,
                                               "sync/num_engines": float(len(engines))}
        metrics["sync/bandwidth_mb_s"] = sender.num_bytes / max(sender.transfer_s, 1e-9) / 1e6
        return metrics
