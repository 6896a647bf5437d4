"""kvrt's counters as vLLM's KVConnectorStats and Prometheus metrics.

Each step the worker reports what changed since its last report (counters)
and the current levels (gauges); the scheduler adds what only it knows (the
tokens vLLM accepted as hits). vLLM merges the two and the steps of a
logging interval with aggregate() (counters add up, levels keep the
largest), logs reduce() and hands the raw dict to KvrtPromMetrics.observe.

Counters, and how they agree (over an interval in which every planned load
finished; an async load may end in the next interval):
    hit_tokens         tokens vLLM took from kvrt (update_state_after_alloc)
    loaded_tokens      tokens copied into vLLM's blocks
    hit_not_loaded_tokens = hit_tokens - loaded_tokens (reduce() only):
                       hits that never arrived (a chunk failed its checksum or
                       was missing, the request ended first)
    load_errors        chunks that could not be loaded
"""

from __future__ import annotations

from typing import Any

# Counters of struct kvrt_stats reported as deltas, under kvrt's names.
COUNTERS = {
    "lookups": "lookups", "lookup_tokens": "lookup_tokens", "prefetches": "prefetches",
    "load_reqs": "load_requests", "load_chunks": "loaded_chunks", "load_tokens": "loaded_tokens",
    "load_failed_chunks": "load_errors", "load_error_blocks": "load_error_blocks",
    "checksum_failures": "checksum_failures", "save_chunks": "saved_chunks",
    "save_dup": "save_already_cached", "evicted": "evictions", "demoted": "demoted_to_disk",
    "promoted": "promoted_from_disk", "remote_writes": "remote_writes",
    "remote_hits": "remote_hits", "remote_errors": "remote_errors",
}
# Sums of struct fields (deltas).
SKIPPED = ("save_skipped_pool", "save_skipped_mailbox", "save_abandoned")
# Levels.
GAUGES = {"pinned": "pins", "chunks": "chunks", "pool_bytes": "pool_bytes",
          "pool_used_bytes": "pool_used_bytes", "cpu_chunks": "cpu_chunks",
          "disk_chunks": "disk_chunks", "disk_used_bytes": "disk_used_bytes"}
GAUGE_NAMES = frozenset(GAUGES.values())
# Counters computed by the shim: scheduler's hits, bytes, and the time
# vLLM's thread spent waiting in kvrt's calls (load: start_load_kv +
# wait_for_layer_load; save: wait_for_save), milliseconds.
EXTRA_COUNTERS = ("hit_tokens", "hit_requests", "loaded_bytes", "saved_tokens", "saved_bytes",
                  "skipped_saves", "load_wait_ms", "save_wait_ms")
COUNTER_NAMES = frozenset(COUNTERS.values()) | frozenset(EXTRA_COUNTERS)


class Tracker:
    """Worker side: turns cumulative C counters into per-report deltas."""

    def __init__(self):
        self.last: dict[str, int] = {}
        self.token_bytes = 0      # KV bytes per token, all layers (register)
        self.chunk_size = 0
        self.wait_ns = {"load_wait_ms": 0, "save_wait_ms": 0}

    def waited(self) -> bool:
        """Wait time worth a report (>= 0.1 ms; less keeps accumulating)."""
        return any(ns >= 100_000 for ns in self.wait_ns.values())

    def delta(self, snap: dict[str, int]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        d = {k: snap[k] - self.last.get(k, 0) for k in snap if k not in GAUGES}
        self.last = dict(snap)
        for k, name in COUNTERS.items():
            if d.get(k):
                out[name] = d[k]
        skipped = sum(d.get(k, 0) for k in SKIPPED)
        if skipped:
            out["skipped_saves"] = skipped
        if d.get("load_tokens") and self.token_bytes:
            out["loaded_bytes"] = d["load_tokens"] * self.token_bytes
        if d.get("save_chunks"):
            # A saved partial tail (save_unfull_chunk) counts as a whole chunk.
            out["saved_tokens"] = d["save_chunks"] * self.chunk_size
            out["saved_bytes"] = out["saved_tokens"] * self.token_bytes
        for k, ns in self.wait_ns.items():
            if ns >= 100_000:
                out[k] = ns / 1e6
                self.wait_ns[k] = 0
        if out:  # levels ride along with any change
            for k, name in GAUGES.items():
                out[name] = snap.get(k, 0)
        return out


def merge(a: dict, b: dict) -> dict:
    """Counters add up; levels keep the largest (several workers: the fullest)."""
    out = dict(a)
    for k, v in (b or {}).items():
        if k in GAUGE_NAMES:
            out[k] = max(out.get(k, 0), v)
        else:
            out[k] = out.get(k, 0) + v
    return out


def reduce(data: dict) -> dict:
    out = dict(data)
    if "hit_tokens" in out or "loaded_tokens" in out:
        out["hit_not_loaded_tokens"] = max(0, out.get("hit_tokens", 0) - out.get("loaded_tokens", 0))
    return out


def prom_metrics_class(base):
    """KvrtPromMetrics over vLLM's KVConnectorPromMetrics (base)."""
    class KvrtPromMetrics(base):
        """One vllm:kvrt_<name> counter or gauge per kvrt stat, per engine."""

        def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues):
            super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
            self._m: dict[tuple[int, str], Any] = {}
            self._fam = {}
            for name in sorted(COUNTER_NAMES):
                self._fam[name] = self._counter_cls(
                    name=f"vllm:kvrt_{name}", documentation=f"kvrt: {name} (kvrt/stats.py)",
                    labelnames=labelnames)
            for name in sorted(GAUGE_NAMES):
                self._fam[name] = self._gauge_cls(
                    name=f"vllm:kvrt_{name}", documentation=f"kvrt: {name} now (kvrt/stats.py)",
                    labelnames=labelnames, multiprocess_mode="mostrecent")
            for idx, values in per_engine_labelvalues.items():
                for name, fam in self._fam.items():
                    self._m[(idx, name)] = fam.labels(*values)

        def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0):
            for name, v in (transfer_stats_data or {}).items():
                m = self._m.get((engine_idx, name))
                if m is None:
                    continue
                if name in GAUGE_NAMES:
                    m.set(v)
                elif v > 0:
                    m.inc(v)

    return KvrtPromMetrics
