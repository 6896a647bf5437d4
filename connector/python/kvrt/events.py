"""KV cache events of kvrt's tiers, published by vLLM for KV-aware routers.

When vLLM publishes KV events (kv_events_config.enable_kv_cache_events),
each kvrt worker keeps its tier events: a chunk became loadable from its
CPU pool, its disk tier or Redis, or stopped being (C: actors/evict.c,
kvrt_worker_kv_events). The worker hands them to vLLM once a step
(get_kv_connector_kv_cache_events, as KvrtKVEvents); vLLM brings every
rank's to the scheduler (update_connector_output), and the scheduler turns
them into vLLM's own BlockStored / BlockRemoved (take_events), published
in the same batch as vLLM's GPU-block events.

What a router needs to join kvrt's events with vLLM's: the events name
vLLM's block hashes of the chunk's blocks (not kvrt's chunk keys), with
the parent block's hash, the token ids, the block size and the LoRA. The
scheduler learns which blocks a chunk key stands for when it looks a
request up or plans its saves (TierEvents.record): the keys are computed
the way the workers compute them (kvrt_sched_chunk_keys). A chunk whose
key it never saw (found on disk at a restart, in Redis under another
instance's prompt) is announced once a request with that prefix comes.

Media, with vLLM's names: the CPU pool is CPU; the local disk tier is
STORAGE with locality LOCAL; Redis is STORAGE with locality REMOTE (shared
with the other instances on it). A chunk is announced for a medium once
every worker (TP x PP ranks: each holds its shard) holds it there, and
removed as soon as one no longer does.

Threads: KvrtKVEvents on the worker thread (and pickled to the engine
core); TierEvents on vLLM's scheduler thread.
"""

from __future__ import annotations

import ctypes as C
from collections import OrderedDict
from typing import Any

from kvrt import _lib

try:  # vLLM >= 0.12
    from vllm.distributed.kv_events import (BlockRemoved, BlockStored,
                                            KVConnectorKVEvents)
except ImportError:  # pragma: no cover  (older vLLM: no connector events)
    BlockRemoved = BlockStored = None
    KVConnectorKVEvents = object

STORED, REMOVED = 1, 2                     # kvrt.h: struct kvrt_kv_event.kind
MEDIA = {1: ("CPU", "LOCAL"), 2: ("STORAGE", "LOCAL"), 4: ("STORAGE", "REMOTE")}
MAX_CHUNKS = 65536                         # chunk keys remembered (oldest go)
TAKE = 4096                                # worker events taken per step


def enabled(vllm_config) -> bool:
    """Whether vLLM publishes KV events (else kvrt keeps none: no cost)."""
    kec = getattr(vllm_config, "kv_events_config", None)
    return bool(kec is not None and getattr(kec, "enable_kv_cache_events", False)
                and getattr(kec, "publisher", "zmq") != "null" and BlockStored is not None)


class KvrtKVEvents(KVConnectorKVEvents):
    """One step's tier events of the workers, as (rank, kind, medium,
    key_lo, key_hi) tuples: vLLM's executor merges the ranks' (add_events,
    increment_workers) and the scheduler's TierEvents counts ranks itself."""

    def __init__(self, events=None, num_workers: int = 1):
        self.events: list = list(events or ())
        self.workers = num_workers

    def add_events(self, events) -> None:
        self.events.extend(events)

    def aggregate(self) -> "KvrtKVEvents":
        return self

    def increment_workers(self, count: int = 1) -> None:
        self.workers += count

    def get_all_events(self) -> list:
        return self.events

    def get_number_of_workers(self) -> int:
        return self.workers

    def clear_events(self) -> None:
        self.events = []


class WorkerEvents:
    """Worker side: drains the C queue into a KvrtKVEvents once a step."""

    def __init__(self, lib, worker, rank: int):
        self._lib, self._worker, self._rank = lib, worker, rank
        self._buf = (_lib.KvEvent * TAKE)()
        self._dropped = C.c_uint64()
        self._warned = 0

    def take(self):
        n = self._lib.kvrt_worker_kv_events(self._worker, self._buf, TAKE, C.byref(self._dropped))
        if self._dropped.value > self._warned:
            import logging
            logging.getLogger("kvrt").warning(
                "kvrt: %d KV events lost to a full queue (routers may see stale tiers)",
                self._dropped.value - self._warned)
            self._warned = self._dropped.value
        if not n:
            return None
        r = self._rank
        return KvrtKVEvents([(r, e.kind, e.medium, e.key_lo, e.key_hi) for e in self._buf[:n]])


class TierEvents:
    """Scheduler side: chunk keys -> vLLM's blocks, ranks' holdings ->
    BlockStored / BlockRemoved."""

    def __init__(self, lib, sched, chunk_size: int, block_size: int, world: int):
        self._lib, self._sched = lib, sched
        self._cs, self._bs, self._world = chunk_size, block_size, max(1, world)
        self._chunks: OrderedDict = OrderedDict()  # key -> (hashes, parent, tokens, lora)
        self._holders: dict = {}                    # (key, medium) -> ranks holding it
        self._published: set = set()                # (key, medium) announced as stored
        self._pending: list = []                    # worker tuples not yet turned
        self._out: list = []                        # vLLM events for the next take
        self._recorded: set = set()                 # request ids whose prompt is known
        self._keys = (C.c_uint64 * 2)()
        self.unknown = 0                            # events for keys never seen
        self.ok = chunk_size % block_size == 0
        from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash
        self._conv = maybe_convert_block_hash

    # --- what a chunk key stands for
    def record(self, request, creq, num_tokens: int) -> None:
        """Learn the chunks of request's first num_tokens tokens (creq: its
        C request over them). Chunks whose blocks vLLM has not hashed yet
        are skipped."""
        if not self.ok:
            return
        hashes = request.block_hashes
        nchunks = min(num_tokens // self._cs, len(hashes) * self._bs // self._cs)
        if nchunks <= 0:
            return
        if len(self._keys) < 2 * nchunks:
            self._keys = (C.c_uint64 * (2 * nchunks))()
        self._lib.kvrt_sched_chunk_keys(self._sched, C.byref(creq.c), False, self._keys, nchunks)
        lora = getattr(request, "lora_request", None)
        lora_id = getattr(lora, "lora_int_id", None) if lora else None
        lora_name = getattr(lora, "lora_name", None) if lora else None
        tokens = request.all_token_ids
        per = self._cs // self._bs
        for i in range(nchunks):
            key = (self._keys[2 * i], self._keys[2 * i + 1])
            if key in self._chunks:
                self._chunks.move_to_end(key)
                continue
            b0 = i * per
            info = ([self._conv(h) for h in hashes[b0:b0 + per]],
                    self._conv(hashes[b0 - 1]) if b0 else None,
                    list(tokens[i * self._cs:(i + 1) * self._cs]), lora_id, lora_name)
            self._chunks[key] = info
            if len(self._chunks) > MAX_CHUNKS:
                self._chunks.popitem(last=False)
            for m in MEDIA:  # held before we knew what it was: announce now
                if (key, m) not in self._published and \
                        len(self._holders.get((key, m), ())) == self._world:
                    self._published.add((key, m))
                    self._out.append(self._stored(info, m))

    def record_once(self, request, creq) -> None:
        if request.request_id not in self._recorded:
            self._recorded.add(request.request_id)
            self.record(request, creq, creq.c.num_tokens)

    def finished(self, request_id: str) -> None:
        self._recorded.discard(request_id)

    # --- workers' events in, vLLM's events out
    def add(self, kv_events) -> None:
        self._pending.extend(kv_events.get_all_events())

    def take(self) -> list:
        out, self._out = self._out, []
        for rank, kind, medium, lo, hi in self._pending:
            key = (lo, hi)
            hk = (key, medium)
            ranks = self._holders.get(hk)
            if kind == STORED:
                if ranks is None:
                    ranks = self._holders[hk] = set()
                ranks.add(rank)
            elif ranks is not None:
                ranks.discard(rank)
                if not ranks:
                    del self._holders[hk]
            held = ranks is not None and len(ranks) == self._world
            if held == (hk in self._published):
                continue
            info = self._chunks.get(key)
            if held:
                if info is None:
                    self.unknown += 1
                    continue
                self._published.add(hk)
                out.append(self._stored(info, medium))
            else:
                self._published.discard(hk)
                if info is not None:
                    out.append(self._removed(info, medium))
        self._pending = []
        return out

    def _stored(self, info, medium):
        hashes, parent, tokens, lora_id, lora_name = info
        name, loc = MEDIA[medium]
        return BlockStored(block_hashes=hashes, parent_block_hash=parent, token_ids=tokens,
                           block_size=self._bs, lora_id=lora_id, medium=name,
                           lora_name=lora_name, **_loc(BlockStored, loc))

    def _removed(self, info, medium):
        name, loc = MEDIA[medium]
        return BlockRemoved(block_hashes=info[0], medium=name, **_loc(BlockRemoved, loc))


def _loc(cls, loc) -> dict[str, Any]:
    return {"locality": loc} if "locality" in getattr(cls, "__struct_fields__", ()) else {}
