"""ctypes binding of connector/kvrt.h, loaded lazily.

The library is looked for, in order: $KVRT_LIB, libkvrt.so next to this
package, <repo>/build/plain/libkvrt.so. The first that loads wins; failing
all, OSError names every path tried and why.
"""

from __future__ import annotations

import ctypes as C
import os
import threading

_LOCK = threading.Lock()
_LIB = None

MAX_DIMS = 6
SCHED_FROM_LOOKUP = 0xFFFFFFFF  # kvrt.h: KVRT_SCHED_FROM_LOOKUP


class Options(C.Structure):
    _fields_ = [("instance", C.c_char_p), ("model_id", C.c_char_p), ("dtype", C.c_char_p),
                ("tp_rank", C.c_uint32), ("tp_size", C.c_uint32),
                ("pp_rank", C.c_uint32), ("pp_size", C.c_uint32),
                ("block_size", C.c_uint32),
                ("keys", C.POINTER(C.c_char_p)), ("values", C.POINTER(C.c_char_p)),
                ("num_keys", C.c_uint32), ("flags", C.c_uint32)]


OPT_WORKERS_ELSEWHERE = 1  # kvrt.h: KVRT_OPT_WORKERS_ELSEWHERE
OPT_KV_EVENTS = 2  # kvrt.h: KVRT_OPT_KV_EVENTS
OPT_CONSUMER = 4  # kvrt.h: KVRT_OPT_CONSUMER


class Bytes(C.Structure):
    _fields_ = [("data", C.c_void_p), ("len", C.c_size_t)]


class Request(C.Structure):
    _fields_ = [("id", C.c_char_p), ("id_len", C.c_uint32),
                ("tokens", C.POINTER(C.c_uint32)), ("num_tokens", C.c_uint32),
                ("total_tokens", C.c_uint32), ("prompt_tokens", C.c_uint32),
                ("cache_salt", Bytes), ("lora_name", C.c_char_p), ("lora_id", C.c_uint64),
                ("extra", C.POINTER(Bytes)), ("num_extra", C.c_uint32)]


class Tensor(C.Structure):
    _fields_ = [("data", C.c_void_p), ("layout", C.c_int), ("elem_size", C.c_uint32),
                ("ndim", C.c_uint32), ("shape", C.c_int64 * MAX_DIMS),
                ("stride", C.c_int64 * MAX_DIMS), ("name", C.c_char_p)]


STAT_FIELDS = ["lookups", "lookup_tokens", "prefetches", "steps", "load_reqs", "load_chunks",
               "load_tokens", "load_failed_chunks", "load_error_blocks", "async_done",
               "save_chunks", "save_dup", "save_skipped_pool", "save_skipped_mailbox",
               "save_abandoned", "checksum_failures", "pinned", "chunks",
               "pool_bytes", "pool_used_bytes", "cpu_chunks", "disk_chunks", "disk_used_bytes",
               "evicted", "demoted", "promoted", "remote_writes", "remote_hits", "remote_errors"]


class Stats(C.Structure):
    _fields_ = [(n, C.c_uint64) for n in STAT_FIELDS] + [("reserved", C.c_uint64 * 8)]


class KvEvent(C.Structure):
    """struct kvrt_kv_event: a chunk stored in / removed from a tier."""
    _fields_ = [("key_lo", C.c_uint64), ("key_hi", C.c_uint64), ("kind", C.c_uint8),
                ("medium", C.c_uint8), ("pad", C.c_uint8 * 6)]


class SchedReq(C.Structure):
    _fields_ = [("req", Request), ("num_computed", C.c_uint32),
                ("block_ids", C.POINTER(C.c_int32)), ("num_blocks", C.c_uint32)]


class SchedStep(C.Structure):
    _fields_ = [("reqs", C.POINTER(SchedReq)), ("num_reqs", C.c_uint32),
                ("preempted", C.POINTER(Bytes)), ("num_preempted", C.c_uint32)]


LAYOUT = {"flash_attn": 1, "flashinfer": 2, "mla": 3, "cpu": 4, "bhnc": 5, "bhnc_mla": 6,
          "bhnc_blocks": 7}


def candidates() -> list[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    out = []
    if os.environ.get("KVRT_LIB"):
        out.append(os.environ["KVRT_LIB"])
    out.append(os.path.join(here, "libkvrt.so"))
    repo = os.path.abspath(os.path.join(here, "..", "..", ".."))
    out.append(os.path.join(repo, "build", "plain", "libkvrt.so"))
    return out


def _declare(lib):
    P, u32, i32, sz = C.c_void_p, C.c_uint32, C.c_int, C.c_size_t
    pu32 = C.POINTER(C.c_uint32)
    sig = {
        "kvrt_worker_create": (i32, [C.POINTER(P), C.POINTER(Options), C.c_char_p, sz]),
        "kvrt_worker_register": (i32, [P, C.POINTER(Tensor), u32]),
        "kvrt_worker_bind": (i32, [P, C.c_char_p, sz]),
        "kvrt_worker_preempted": (i32, [P]),
        "kvrt_worker_step_work": (u32, [P]),
        "kvrt_worker_start_load": (i32, [P]),
        "kvrt_worker_wait_layer": (i32, [P, u32]),
        "kvrt_worker_save_layer": (i32, [P, u32]),
        "kvrt_worker_wait_save": (i32, [P]),
        "kvrt_worker_get_finished": (i32, [P, C.c_char_p, sz, pu32, pu32, pu32]),
        "kvrt_worker_load_errors": (sz, [P, C.POINTER(C.c_int64), sz]),
        "kvrt_worker_stats": (i32, [P, C.POINTER(Stats)]),
        "kvrt_worker_flush": (i32, [P]),
        "kvrt_worker_kv_events": (sz, [P, C.POINTER(KvEvent), sz, C.POINTER(C.c_uint64)]),
        "kvrt_worker_destroy": (None, [P]),
        "kvrt_sched_create": (i32, [C.POINTER(P), C.POINTER(Options), C.c_char_p, sz]),
        "kvrt_sched_destroy": (None, [P]),
        "kvrt_sched_reset_cache": (i32, [P]),
        "kvrt_sched_lookup": (i32, [P, C.POINTER(Request), u32, pu32, C.POINTER(C.c_bool)]),
        "kvrt_sched_after_alloc": (i32, [P, C.POINTER(Request), C.POINTER(C.c_int32), u32, u32, u32]),
        "kvrt_sched_save_need": (u32, [P, C.c_char_p, u32, u32, u32]),
        "kvrt_sched_rewound": (i32, [P, C.c_char_p, u32, u32]),
        "kvrt_sched_build_meta": (i32, [P, C.POINTER(SchedStep), C.POINTER(P), C.POINTER(sz)]),
        "kvrt_sched_finished": (i32, [P, C.c_char_p, u32, C.POINTER(C.c_bool)]),
        "kvrt_sched_sees_worker": (C.c_bool, [P]),
        "kvrt_sched_config_get": (i32, [P, C.c_char_p, C.c_char_p, sz]),
        "kvrt_sched_chunk_keys": (u32, [P, C.POINTER(Request), C.c_bool,
                                        C.POINTER(C.c_uint64), u32]),
        "kvrt_debug_corrupt_chunk": (i32, [P, C.POINTER(Request), u32]),
    }
    for name, (res, args) in sig.items():
        f = getattr(lib, name)
        f.restype = res
        f.argtypes = args


def lib():
    """The loaded library (loads it on the first call)."""
    global _LIB
    with _LOCK:
        if _LIB is not None:
            return _LIB
        tried = []
        for path in candidates():
            if not os.path.exists(path):
                tried.append(f"{path} (missing)")
                continue
            try:
                handle = C.CDLL(path)
            except OSError as e:
                tried.append(f"{path} ({e})")
                continue
            _declare(handle)
            _LIB = handle
            return _LIB
        raise OSError("kvrt: cannot load libkvrt.so; tried: " + "; ".join(tried)
                      + ". Set KVRT_LIB to the library's path.")


def options(instance, model_id, dtype, block_size, extra: dict, tp_rank=0, tp_size=1,
            pp_rank=0, pp_size=1, flags=0):
    """An Options struct plus the objects that must outlive it."""
    keys = [str(k).encode() for k in extra]
    vals = [_text(v).encode() for v in extra.values()]
    ka = (C.c_char_p * max(1, len(keys)))(*keys)
    va = (C.c_char_p * max(1, len(vals)))(*vals)
    o = Options(instance.encode(), model_id.encode(), dtype.encode(), tp_rank, tp_size,
                pp_rank, pp_size, block_size, ka, va, len(keys), flags)
    return o, (keys, vals, ka, va)


def _text(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "none"
    return str(v)


def errmsg(buf) -> str:
    return buf.value.decode(errors="replace")


def parse_ids(raw: bytes, counts):
    """Records (u16 length, bytes) into lists of str, split by counts."""
    out, off = [], 0
    for n in counts:
        ids = set()
        for _ in range(n):
            ln = raw[off] | raw[off + 1] << 8
            ids.add(raw[off + 2:off + 2 + ln].decode(errors="surrogateescape"))
            off += 2 + ln
        out.append(ids)
    return out
