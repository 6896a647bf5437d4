#!/usr/bin/env python3
"""perf/lmcache_bench.py: LMCache's figures for `kvrt-perf lmcache`.

Runs inside a venv where LMCache (PyPI `lmcache`) is importable, on CPU, with
no GPU and no vLLM engine, and measures what kvrt's side-by-side compares:

  hash     ChunkedTokenDatabase.process_tokens(tokens, make_key=False) over
           the whole prompt: what LMCacheLookupClient.lookup does in the
           scheduler before it asks the workers
           (lmcache/v1/lookup_client/lmcache_lookup_client.py).
  lookup   LMCacheLookupClient.lookup(tokens, lookup_id) end to end against a
           real LMCacheLookupServer over LMCache's own ZMQ transport (the
           default scheduler path, LookupClientFactory without async loading
           or bypass): scheduler-side hashing, one ZMQ round trip, and on the
           worker LMCacheEngine.lookup(hashes, offsets, pin=True), i.e.
           process_tokens(hashes=...) -> CacheEngineKey per chunk,
           StorageManager.batched_contains (LocalCPUBackend: dict membership
           + pin per chunk, stops at the first miss), lookup_pins, touch_cache.
           Every chunk of the prompt is stored, so it walks all of them.
           The server runs on a thread of this process (vLLM runs it in the
           worker process): the IPC is real, the process hop is not.
  worker   LMCacheEngine.lookup(hashes=..., offsets=..., pin=True) alone
           (the worker's share of `lookup`, no hashing, no IPC).
  put/get  CPU tier, one chunk of the given bytes: put = what
           LMCacheEngine.store does minus the GPU copy (StorageManager.allocate
           -> copy the chunk into MemoryObj.tensor -> StorageManager.batched_put
           into LocalCPUBackend); get = what retrieve does minus the GPU copy
           (get_block_mapping -> batched_get -> copy out -> ref_count_down).

Prompts (the C side makes the same ones): one sequence of 131072 (or the
largest --tokens) token ids from xorshift64 with state s = 7, per token
    s ^= s << 13; s ^= s >> 7; s ^= s << 17   (mod 2**64)
    token = s % 151936
and each prompt of n tokens is its first n tokens.

Output: a table on stdout and, with --json OUT, a flat JSON object
    {"tool": "lmcache_bench", "lmcache_version": "...", "torch_version": "...",
     "torch_threads": N, "chunk": 256, "chunk_bytes": N, "reps": N,
     "results": [{"tokens": N, "hash_us": x, "lookup_us": x, "worker_lookup_us": x}, ...],
     "put_gbps": x, "get_gbps": x, "skipped": [{"part": "...", "why": "..."}]}
Times are p50 over --reps repetitions (microseconds); a figure that could not
be measured is null and its part is listed in "skipped". Exit status 0 when
the JSON was written, even with parts skipped; 2 when LMCache is missing.
"""
import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback

VOCAB = 151936
MASK64 = (1 << 64) - 1


def make_tokens(n):
    """The shared prompt: xorshift64 from state 7 (see the header)."""
    s, out = 7, [0] * n
    for i in range(n):
        s ^= (s << 13) & MASK64
        s ^= s >> 7
        s ^= (s << 17) & MASK64
        out[i] = s % VOCAB
    return out


def p50_us(samples):
    return statistics.median(samples) * 1e6


def quiet_lmcache():
    """Before LMCache is imported: no usage telemetry (it would post to its
    stats server; nothing may leave this machine), and log at ERROR (LMCache
    logs a warning on every allocation that has to evict: kept out of the
    timed path, which favours LMCache slightly)."""
    os.environ["LMCACHE_TRACK_USAGE"] = "false"
    os.environ["DO_NOT_TRACK"] = "1"
    os.environ["LMCACHE_LOG_LEVEL"] = "ERROR"


def build_engine(name, chunk, kv_shape, cpu_gb, engine_id):
    import torch
    from lmcache.v1.cache_engine import LMCacheEngineBuilder
    from lmcache.v1.config import LMCacheEngineConfig
    from lmcache.v1.metadata import LMCacheMetadata

    cfg = LMCacheEngineConfig.from_defaults(chunk_size=chunk, local_cpu=True, max_local_cpu_size=cpu_gb)
    md = LMCacheMetadata(
        model_name="perf",
        world_size=1,
        local_world_size=1,
        worker_id=0,
        local_worker_id=0,
        kv_dtype=torch.bfloat16,
        kv_shape=kv_shape,
        engine_id=engine_id,
        role="worker",
        chunk_size=chunk,
    )
    eng = LMCacheEngineBuilder.get_or_create(name, cfg, md, None, lambda *a: None, lambda *a: None)
    eng.post_init()
    if eng.storage_manager is None:
        raise RuntimeError("LMCacheEngine.post_init made no storage manager")
    return cfg, md, eng


def destroy_engine(name):
    from lmcache.v1.cache_engine import LMCacheEngineBuilder

    try:
        LMCacheEngineBuilder.destroy(name)
    except Exception:  # teardown noise must not lose the figures
        pass


def store_keys(eng, md, keys):
    """Put a small MemoryObj under each key (lookups only test membership)."""
    sm = eng.storage_manager
    shapes, dtypes = md.get_shapes(), md.get_dtypes()
    for k in keys:
        obj = sm.allocate(shapes, dtypes)
        if obj is None:
            raise RuntimeError("LocalCPUBackend is full while storing the prompt's chunks")
        obj.tensor.fill_(1)
        sm.batched_put([k], [obj])


def bench_lookup(args, tokens_all, sizes, res, skipped):
    """hash, end-to-end lookup and worker lookup for every prompt size."""
    from lmcache.v1.lookup_client.factory import LookupClientFactory

    name = "kvrt-perf-lookup"
    # Tiny chunks: membership does not depend on the chunk's bytes, and 512
    # chunks of 32 MiB would not fit in this machine's memory.
    kv_shape = (1, 2, args.chunk, 1, 16)
    engine_id = "kvrt-perf-%d" % os.getpid()
    rpc_dir = tempfile.mkdtemp(prefix="kvrt-lmc-rpc-")
    os.environ["VLLM_RPC_BASE_PATH"] = rpc_dir
    cfg, md, eng = build_engine(name, args.chunk, kv_shape, 0.05, engine_id)
    server = client = None
    try:
        db = eng.token_database
        keys = [k for (_s, _e, k) in db.process_tokens(tokens_all)]
        store_keys(eng, md, keys)
        try:
            server = LookupClientFactory.create_lookup_server(eng, md)
            client = LookupClientFactory.create_lookup_client(cfg, md)
        except Exception as e:
            skipped.append({"part": "lookup", "why": "LMCache's ZMQ lookup client/server did not start: %r" % e})
            server = client = None
        rid = 0
        for n in sizes:
            toks = tokens_all[:n]
            want = n - n % args.chunk
            t_hash, t_look, t_work = [], [], []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                hs = list(db.process_tokens(toks, make_key=False))
                t_hash.append(time.perf_counter() - t0)
                hashes = [h for (_s, _e, h) in hs]
                offsets = [e - s for (s, e, _h) in hs]

                rid += 1
                lid = "w%d" % rid
                t0 = time.perf_counter()
                got = eng.lookup(hashes=hashes, offsets=offsets, lookup_id=lid, pin=True)
                t_work.append(time.perf_counter() - t0)
                eng.lookup_unpin(lid)
                if got != want:
                    raise RuntimeError("worker lookup found %d of %d tokens" % (got, want))

                if client is not None:
                    lid = "r%d" % rid
                    t0 = time.perf_counter()
                    got = client.lookup(toks, lookup_id=lid)
                    t_look.append(time.perf_counter() - t0)
                    client.clear_lookup_status(lid)
                    eng.lookup_unpin(lid)
                    if got != want:
                        raise RuntimeError("lookup found %s of %d tokens" % (got, want))
            r = res.setdefault(n, {"tokens": n})
            r["hash_us"] = p50_us(t_hash)
            r["worker_lookup_us"] = p50_us(t_work)
            r["lookup_us"] = p50_us(t_look) if t_look else None
    finally:
        for c in (client, server):
            if c is not None:
                try:
                    c.close()
                except Exception:
                    pass
        destroy_engine(name)
        shutil.rmtree(rpc_dir, ignore_errors=True)


def bench_put_get(args, skipped):
    """CPU-tier put/get GB/s of one chunk of args.chunk_mb MiB (p50)."""
    import torch

    name = "kvrt-perf-putget"
    chunk_bytes = args.chunk_mb << 20
    # Llama-3.1-8B: 32 layers, K and V, 256 tokens, 8 heads x 128, bf16 = 32 MiB.
    # Other sizes keep 32 layers and 256 tokens and change the heads.
    hidden = chunk_bytes // (32 * 2 * args.chunk * 2)  # heads x head_dim
    if hidden < 16 or hidden * 32 * 2 * args.chunk * 2 != chunk_bytes:
        raise RuntimeError("chunk_mb=%d is not 32 layers x 2 x %d tokens x bf16 x whole heads"
                           % (args.chunk_mb, args.chunk))
    dim = 128 if hidden % 128 == 0 else 16
    kv_shape = (32, 2, args.chunk, hidden // dim, dim)
    slabs = 8
    gb = slabs * chunk_bytes / 1024**3
    _cfg, md, eng = build_engine(name, args.chunk, kv_shape, gb, "kvrt-perf-pg-%d" % os.getpid())
    try:
        sm = eng.storage_manager
        shapes, dtypes = md.get_shapes(), md.get_dtypes()
        src = torch.empty(shapes[0], dtype=dtypes[0])
        g = torch.Generator().manual_seed(1)
        src.view(torch.int16).copy_(torch.randint(-32768, 32767, src.shape, generator=g, dtype=torch.int16))
        dst = torch.full_like(src, 1.0)
        nbytes = src.numel() * src.element_size()
        from lmcache.utils import CacheEngineKey

        def key(i):
            return CacheEngineKey("perf", 1, 0, 0x9E3779B97F4A7C15 * (i + 1) & MASK64, torch.bfloat16, None)

        # Warm-up: fault every page of the pool in (and fill it to eviction).
        for i in range(slabs * 2):
            obj = sm.allocate(shapes, dtypes)
            if obj is None:
                raise RuntimeError("allocate returned None while warming up")
            obj.tensor.copy_(src)
            sm.batched_put([key(1_000_000 + i)], [obj])
        t_put, t_get = [], []
        n = args.reps * 3
        for i in range(n):
            k = key(i)
            t0 = time.perf_counter()
            obj = sm.allocate(shapes, dtypes)  # evicts LRU entries when full
            if obj is None:
                raise RuntimeError("allocate returned None (pool full, nothing evictable)")
            obj.tensor.copy_(src)
            sm.batched_put([k], [obj])  # drops the allocation's reference
            t_put.append(time.perf_counter() - t0)

            t0 = time.perf_counter()
            bm = sm.get_block_mapping([(k, 0, args.chunk)])
            objs = sm.batched_get([k], location=next(iter(bm))) if bm else [None]
            if objs[0] is not None:
                dst.copy_(objs[0].tensor)
                objs[0].ref_count_down()
            t_get.append(time.perf_counter() - t0)
            if objs[0] is None:
                raise RuntimeError("get missed a chunk just put")
        if not torch.equal(src.view(torch.int16), dst.view(torch.int16)):
            raise RuntimeError("get returned different bytes")
        return nbytes, nbytes / statistics.median(t_put) / 1e9, nbytes / statistics.median(t_get) / 1e9
    finally:
        destroy_engine(name)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", default="1024,8192,32768,131072")
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--chunk-mb", type=int, default=32, help="put/get chunk bytes in MiB (32: Llama-3.1-8B)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    sizes = sorted({int(x) for x in args.tokens.split(",") if x.strip()})
    if not sizes or sizes[0] < args.chunk or args.chunk < 1 or args.reps < 1:
        ap.error("need --tokens >= --chunk >= 1 and --reps >= 1")

    out = {"tool": "lmcache_bench", "chunk": args.chunk, "reps": args.reps, "results": [],
           "put_gbps": None, "get_gbps": None, "chunk_bytes": None, "skipped": []}
    skipped = out["skipped"]
    quiet_lmcache()
    try:
        import torch
        import lmcache

        out["torch_version"] = torch.__version__
        out["torch_threads"] = torch.get_num_threads()  # torch's copy_ splits big copies over these
        out["lmcache_version"] = getattr(lmcache, "__version__", None)
        if out["lmcache_version"] is None:
            from importlib.metadata import version

            out["lmcache_version"] = version("lmcache")
    except Exception as e:
        print("lmcache_bench: LMCache is not importable here: %r" % e, file=sys.stderr)
        if args.json:
            skipped.append({"part": "all", "why": "LMCache not importable: %r" % e})
            with open(args.json, "w") as f:
                json.dump(out, f)
        return 2
    try:
        import lmcache.cuda_ops  # noqa: F401  (only reported: nothing here needs it)
    except Exception as e:
        skipped.append({"part": "gpu kernels",
                        "why": "lmcache.cuda_ops does not load (%s): store/retrieve to vLLM's paged GPU "
                               "blocks are not measured, only the CPU tier" % str(e).split(":")[-1].strip()})

    tokens_all = make_tokens(sizes[-1])
    res = {}
    try:
        bench_lookup(args, tokens_all, sizes, res, skipped)
    except Exception as e:
        traceback.print_exc(file=sys.stderr)
        skipped.append({"part": "hash+lookup", "why": repr(e)})
    try:
        nbytes, put, get = bench_put_get(args, skipped)
        out.update(chunk_bytes=nbytes, put_gbps=put, get_gbps=get)
    except Exception as e:
        traceback.print_exc(file=sys.stderr)
        skipped.append({"part": "put/get", "why": repr(e)})
    gc.collect()

    out["results"] = [res.get(n, {"tokens": n}) for n in sizes]
    for r in out["results"]:
        for k in ("hash_us", "lookup_us", "worker_lookup_us"):
            r.setdefault(k, None)

    def fmt(v):
        return "%12.1f" % v if isinstance(v, float) else "%12s" % "-"

    print("LMCache %s (torch %s), chunk %d tokens, p50 of %d reps"
          % (out["lmcache_version"], out["torch_version"], args.chunk, args.reps))
    print("%10s %12s %12s %12s" % ("tokens", "hash us", "lookup us", "worker us"))
    for r in out["results"]:
        print("%10d %s %s %s" % (r["tokens"], fmt(r["hash_us"]), fmt(r["lookup_us"]), fmt(r["worker_lookup_us"])))
    if out["put_gbps"] is not None:
        print("CPU tier, %d-byte chunk: put %.2f GB/s, get %.2f GB/s"
              % (out["chunk_bytes"], out["put_gbps"], out["get_gbps"]))
    for s in skipped:
        print("skipped %s: %s" % (s["part"], s["why"]))
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(out, f)
        os.replace(tmp, args.json)
    sys.stdout.flush()
    # LMCache's background threads (storage manager loop, stats) can hold the
    # interpreter at exit; the figures are written, so leave at once.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
