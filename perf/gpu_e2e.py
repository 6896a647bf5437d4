#!/usr/bin/env python3
"""perf/gpu_e2e.py: the e2e replay's GPU part, on real CUDA tensors.

Run by perf/gpu-check.sh on a machine with a GPU and PyTorch (vLLM is not
needed): the same C API the vLLM shim calls (connector/kvrt.h, through the
shim's ctypes binding kvrt._lib), the same call order as a vLLM step, on
torch CUDA tensors shaped like Llama-3.1-8B's KV cache (32 layers, 8 KV
heads x 128, bf16, block 16, FlashAttention layout), chunks of 256 tokens,
layerwise loads (use_layerwise).

What it does:
  1. save: one 8192-token document is prefilled and saved (GPU -> pinned CPU
     pool); save GB/s is measured up to the moment the chunks are indexed.
  2. long-document questions: a request = the document + a new question.
     kvrt finds the document (8192 tokens, 1 GiB of KV) and loads it layer by
     layer while each layer's "attention" runs: a kernel that spins for the
     modeled time (the question's tokens / 10000 tokens/s / 32 layers, the
     prefill model of kvrt-perf e2e) on the compute stream. Per question size:
       copy only      loads, no attention: the copy time
       compute only   attention, no kvrt: the compute time
       both           the step as vLLM runs it
       load stall     both - compute: what the forward waited for loads
     and the copy's GB/s against pinned cudaMemcpyAsync host->device measured
     in the same run.
  3. every load is checked byte for byte against the KV saved in step 1.

Exit: 77 without torch or a CUDA device, 1 on a kvrt error or wrong bytes,
0 otherwise (a slow figure is a figure, not a failure). Full results go to
$OUT/gpu_e2e.json when OUT is set; the table is printed last.

  python3 perf/gpu_e2e.py --cpu   the same on CPU tensors and kvrt's host
  backend, attention slept (a check of this script where there is no GPU;
  tests/check-gpu-e2e-cpu.sh runs it, with 4 layers)
"""

import ctypes as C
import json
import os
import random
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "connector", "python"))

from kvrt import _lib  # noqa: E402

LAYERS, HEADS, HEAD, BS, CS = 32, 8, 128, 16, 256
FULL_LAYERS = 32                # the model's; --cpu runs fewer
DOC = 8192                      # cached tokens
QUESTIONS = (64, 1024)          # new tokens per step
RATE = 10000.0                  # modeled prefill tokens/s (1x H100, kvrt-perf e2e)
REPS = 3
TOKEN_BYTES = LAYERS * 2 * HEADS * HEAD * 2


class Fail(Exception):
    pass


def ok(rc, what):
    if rc:
        raise Fail(f"{what} returned {rc}")


class Req:
    """A request for the C API (keeps its buffers alive)."""

    def __init__(self, rid, tokens):
        self.id = rid.encode()
        self.n = len(tokens)
        self.tok = (C.c_uint32 * self.n)(*tokens)
        self.c = _lib.Request(self.id, len(self.id), self.tok, self.n, self.n, self.n,
                              _lib.Bytes(None, 0), None, 0, None, 0)
        self.hit = 0
        self.blocks = []
        self.bids = None


class Rig:
    def __init__(self, torch, cpu):
        self.torch = torch
        self.cpu = cpu
        self.lib = _lib.lib()
        dev = torch.device("cpu" if cpu else "cuda")
        steps = 1 + len(QUESTIONS) * (2 * REPS + 1)
        self.nblocks = steps * ((DOC + max(QUESTIONS)) // BS + 1) + 64
        g = torch.Generator(device=dev)
        g.manual_seed(7)
        self.kv = [torch.randn((2, self.nblocks, BS, HEADS, HEAD), dtype=torch.bfloat16, device=dev,
                               generator=g) for _ in range(LAYERS)]
        self.next_block = 1  # block 0 is vLLM's null block
        # the document (1 GiB of KV; --cpu 128 MiB) and the questions' chunks
        extra = {"chunk_size": CS, "use_layerwise": True, "max_local_cpu_size": 1 if cpu else 4,
                 "device": "host" if cpu else "cuda"}
        self.opts, self._keep = _lib.options("kvrt-gpu-e2e", "meta-llama/Llama-3.1-8B-Instruct",
                                             "bfloat16", BS, extra)
        err = C.create_string_buffer(1024)
        self.w, self.s = C.c_void_p(), C.c_void_p()
        rc = self.lib.kvrt_worker_create(C.byref(self.w), C.byref(self.opts), err, len(err))
        if rc:
            raise Fail(f"worker_create: {_lib.errmsg(err)} ({rc})")
        names = [f"layer{i}".encode() for i in range(LAYERS)]
        self._names = names
        ts = []
        for t, nm in zip(self.kv, names):
            ts.append(_lib.Tensor(t.data_ptr(), _lib.LAYOUT["flash_attn"], t.element_size(), t.dim(),
                                  (C.c_int64 * _lib.MAX_DIMS)(*t.shape),
                                  (C.c_int64 * _lib.MAX_DIMS)(*t.stride()), nm))
        arr = (_lib.Tensor * LAYERS)(*ts)
        ok(self.lib.kvrt_worker_register(self.w, arr, LAYERS), "worker_register")
        rc = self.lib.kvrt_sched_create(C.byref(self.s), C.byref(self.opts), err, len(err))
        if rc:
            raise Fail(f"sched_create: {_lib.errmsg(err)} ({rc})")
        self.fin = C.create_string_buffer(1 << 16)

    def close(self):
        self.lib.kvrt_sched_destroy(self.s)
        self.lib.kvrt_worker_destroy(self.w)

    def take(self, n):
        b = list(range(self.next_block, self.next_block + n))
        self.next_block += n
        if self.next_block > self.nblocks:
            raise Fail("out of blocks")
        return b

    def schedule(self, r):
        """Scheduler side of one step for request r: lookup, blocks,
        after_alloc, save_need, build_meta. Returns the metadata bytes."""
        lib = self.lib
        n, is_async = C.c_uint32(), C.c_bool()
        ok(lib.kvrt_sched_lookup(self.s, C.byref(r.c), 0, C.byref(n), C.byref(is_async)), "sched_lookup")
        r.hit = n.value
        nb = (r.n + BS - 1) // BS
        r.blocks = self.take(nb)
        r.bids = (C.c_int32 * nb)(*r.blocks)
        ok(lib.kvrt_sched_after_alloc(self.s, C.byref(r.c), r.bids, nb, 0, r.hit), "after_alloc")
        need = lib.kvrt_sched_save_need(self.s, r.id, len(r.id), r.n, r.n)
        sr = (_lib.SchedReq * 1)(_lib.SchedReq(r.c, r.n, r.bids if need else None, nb if need else 0))
        st = _lib.SchedStep(sr, 1, None, 0)
        ptr, ln = C.c_void_p(), C.c_size_t()
        ok(lib.kvrt_sched_build_meta(self.s, C.byref(st), C.byref(ptr), C.byref(ln)), "build_meta")
        return C.string_at(ptr, ln.value)

    def forward(self, meta, attn, use_kvrt=True):
        """Worker side: bind, start_load, per layer wait / attention (attn:
        _sleep cycles on a GPU, seconds on the CPU) / save, wait_save.
        Returns (wall s, GPU s between events around the step)."""
        torch, lib = self.torch, self.lib
        gpu = not self.cpu
        if gpu:
            torch.cuda.synchronize()
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        if gpu:
            e0.record()
        if use_kvrt:
            ok(lib.kvrt_worker_bind(self.w, meta, len(meta)), "worker_bind")
            ok(lib.kvrt_worker_start_load(self.w), "start_load")
        for layer in range(LAYERS):
            if use_kvrt:
                ok(lib.kvrt_worker_wait_layer(self.w, layer), "wait_layer")
            if attn and gpu:
                torch.cuda._sleep(attn)
            elif attn:
                time.sleep(attn)
            if use_kvrt:
                ok(lib.kvrt_worker_save_layer(self.w, layer), "save_layer")
        if use_kvrt:
            ok(lib.kvrt_worker_wait_save(self.w), "wait_save")
        if gpu:
            e1.record()
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        errs = (C.c_int64 * 64)()
        if use_kvrt and lib.kvrt_worker_load_errors(self.w, errs, 64):
            raise Fail("load errors reported")
        return wall, (e0.elapsed_time(e1) / 1e3 if gpu else wall)

    def finish(self, r):
        delay = C.c_bool()
        ok(self.lib.kvrt_sched_finished(self.s, r.id, len(r.id), C.byref(delay)), "sched_finished")

    def kv_of(self, r, ntok):
        """r's KV of tokens [0, ntok): one tensor per layer (a copy)."""
        idx = self.torch.tensor(r.blocks[:ntok // BS], device=self.kv[0].device)
        return [t.index_select(1, idx).clone() for t in self.kv]


def calibrate(torch):
    """Cycles of torch.cuda._sleep per second."""
    torch.cuda._sleep(1000)
    torch.cuda.synchronize()
    n = 20_000_000
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    torch.cuda._sleep(n)
    e1.record()
    torch.cuda.synchronize()
    return n / (e0.elapsed_time(e1) / 1e3)


PEAK_NAME = {False: "pinned H2D peak", True: "memcpy"}


def memcpy_peak(nbytes):
    """Best memcpy GB/s of a few runs (the --cpu limit)."""
    src = (C.c_char * nbytes)()
    dst = (C.c_char * nbytes)()
    C.memmove(dst, src, nbytes)
    best = 0.0
    for _ in range(3):
        t0 = time.perf_counter()
        C.memmove(dst, src, nbytes)
        best = max(best, nbytes / (time.perf_counter() - t0) / 1e9)
    return best


def h2d_peak(torch, nbytes):
    """Best pinned host -> device cudaMemcpyAsync GB/s of a few runs."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    best = 0.0
    for _ in range(4):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        dst.copy_(src, non_blocking=True)
        e1.record()
        torch.cuda.synchronize()
        best = max(best, nbytes / (e0.elapsed_time(e1) / 1e3) / 1e9)
    return best


def run(torch, cpu):
    out = {"model": "Llama-3.1-8B shapes", "layers": LAYERS, "doc_tokens": DOC, "chunk": CS,
           "block": BS, "prefill_model_tok_s": RATE,
           "gpu": "none (--cpu: host backend)" if cpu else torch.cuda.get_device_name(0)}
    rig = Rig(torch, cpu)
    rows = []
    try:
        rng = random.Random(11)
        doc = [rng.randrange(128000) for _ in range(DOC)]
        cps = 1.0 if cpu else calibrate(torch)
        peak = memcpy_peak(DOC * TOKEN_BYTES) if cpu else h2d_peak(torch, DOC * TOKEN_BYTES)
        out["h2d_pinned_peak_gbs"] = peak
        # 1. save the document
        a = Req("doc", doc)
        meta = rig.schedule(a)
        t0 = time.perf_counter()
        rig.forward(meta, 0)
        ok(rig.lib.kvrt_worker_flush(rig.w), "flush")
        save_s = time.perf_counter() - t0
        ref = rig.kv_of(a, DOC)
        rig.finish(a)
        out["save_gbs"] = DOC * TOKEN_BYTES / save_s / 1e9
        rows.append((f"save {DOC} tokens (into the CPU pool, until indexed)", f"{save_s * 1e3:.1f} ms",
                     f"{out['save_gbs']:.1f} GB/s", ""))
        # 2. questions
        k = 0
        for q in QUESTIONS:
            attn = q / RATE / FULL_LAYERS  # per layer, as in the full model (--cpu has fewer)
            cycles = attn if cpu else max(1, int(attn * cps))
            res = {"copy": [], "compute": [], "both": [], "copy_gpu": []}
            for rep in range(REPS):
                for mode in ("copy", "both"):
                    k += 1
                    r = Req(f"q{k}", doc + [rng.randrange(128000) for _ in range(q)])
                    meta = rig.schedule(r)
                    if r.hit != DOC:
                        raise Fail(f"question {k}: kvrt matched {r.hit} tokens, want {DOC}")
                    wall, gpu = rig.forward(meta, cycles if mode == "both" else 0)
                    res[mode].append(wall)
                    if mode == "copy":
                        res["copy_gpu"].append(gpu)
                    got = rig.kv_of(r, DOC)
                    for layer in range(LAYERS):
                        if not torch.equal(got[layer], ref[layer]):
                            raise Fail(f"question {k}: layer {layer}: loaded KV differs from the saved KV")
                    rig.finish(r)
                res["compute"].append(rig.forward(b"", cycles, use_kvrt=False)[0])
            copy, comp, both = min(res["copy"]), min(res["compute"]), min(res["both"])
            stall = max(0.0, both - comp)
            gbs = DOC * TOKEN_BYTES / copy / 1e9
            out[f"q{q}"] = {"attention_per_layer_ms": attn * 1e3, "copy_ms": copy * 1e3,
                            "copy_gpu_ms": min(res["copy_gpu"]) * 1e3, "compute_ms": comp * 1e3,
                            "both_ms": both * 1e3, "load_stall_ms": stall * 1e3, "copy_gbs": gbs,
                            "copy_vs_h2d_peak": gbs / peak, "both_vs_ideal": both / max(copy, comp)}
            rows.append((f"{q}-token question: load copy only", f"{copy * 1e3:.1f} ms",
                         f"{gbs:.1f} GB/s", f"{gbs / peak:.2f}x {PEAK_NAME[cpu]} {peak:.1f} GB/s"))
            rows.append((f"{q}-token question: attention only ({attn * 1e3:.2f} ms/layer)",
                         f"{comp * 1e3:.1f} ms", "", ""))
            rows.append((f"{q}-token question: step with layerwise loads", f"{both * 1e3:.1f} ms",
                         f"stall {stall * 1e3:.1f} ms",
                         f"{both / max(copy, comp):.2f}x ideal max(copy, compute)"))
        out["ok"] = True
    finally:
        rig.close()
    return out, rows


def main():
    global LAYERS, TOKEN_BYTES
    cpu = "--cpu" in sys.argv[1:]
    try:
        import torch
    except ImportError:
        print("gpu_e2e: skip: no torch")
        return 77
    if cpu:
        LAYERS = 4  # host memcpy of 32 layers' KV would take the machine's memory and time
        TOKEN_BYTES = LAYERS * 2 * HEADS * HEAD * 2
    elif not torch.cuda.is_available():
        print("gpu_e2e: skip: no CUDA device")
        return 77
    os.environ.setdefault("KVRT_DEVICE", "host" if cpu else "cuda")
    rc = 0
    try:
        out, rows = run(torch, cpu)
    except Fail as e:
        out, rows, rc = {"ok": False, "error": str(e)}, [], 1
        print(f"gpu_e2e: FAIL: {e}")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "gpu_e2e.json"), "w") as f:
            json.dump(out, f, indent=1)
    if rows:
        print(f"gpu_e2e: {out.get('gpu')}; Llama-3.1-8B shapes ({LAYERS} layers), {DOC}-token document cached, "
              f"layerwise loads, best of {REPS}; every load byte-exact")
        for name, a, b, c in rows:
            print(f"  {name:58s} {a:>10s} {b:>16s}  {c}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
