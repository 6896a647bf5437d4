#!/usr/bin/env python3
"""Probe: drive vLLM's REAL v1 Scheduler + KV connector on a CPU-only machine.

No GPU, no model hub, no network, no subprocess.  Proves the harness that
kvrt's "against the real vLLM" tests need (see VLLM-RECIPE.md):

  * VllmConfig from a local tiny Llama config.json (HF_HUB_OFFLINE=1),
  * the connector class defined HERE (ProbeConnector), loaded by vLLM's own
    KVConnectorFactory through kv_connector_module_path="vllm_probe",
  * vLLM's real Scheduler (role SCHEDULER connector built inside it),
  * the WORKER connector built by the same factory, fed through vLLM's real
    worker glue (vllm.v1.worker.gpu.kv_connector.ActiveKVConnector:
    handle_preemptions / bind / start_load_kv / wait_for_save /
    get_transfer_results / load errors) with CPU tensors allocated by vLLM's
    own allocate_kv_cache() in the resolved KV layout,
  * a fake "model" that writes deterministic KV for scheduled tokens and calls
    wait_for_layer_load/save_kv_layer per layer like the attention decorator,
  * ModelRunnerOutput + KVConnectorOutput fed back to update_from_output().

ProbeConnector is a tiny in-process store (dict) used only to prove the
harness; kvrt's connector replaces it.

Run:  HF_HUB_OFFLINE=1 /path/to/venv/bin/python tests/python/vllm_probe.py
Exit code 0 = every scenario's checks passed.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

# --- environment: must be set before vllm is imported ----------------------
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
# model-info cache (avoids re-running the registry subprocess) kept private
_CACHE_ROOT = os.environ.setdefault(
    "VLLM_CACHE_ROOT", os.path.join(tempfile.gettempdir(), "kvrt-vllm-probe-cache")
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from vllm.distributed.kv_transfer.kv_connector.v1.base import (  # noqa: E402
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

BLOCK = 16
LAYERS = ["model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"]

# ----------------------------------------------------------------------------
# The probe connector (both roles).  Shared in-process "remote store": STORE.
# ----------------------------------------------------------------------------
STORE: dict[str, dict[str, torch.Tensor]] = {}   # key -> layer -> [H, N, C]
CORRUPT: set[str] = set()                         # keys whose load must fail
HOLD_ASYNC: dict[str, bool] = {}                  # req_id -> hold finished_recving
CALLS: list[tuple] = []                           # (role, method, detail)


def _rec(role: str, name: str, detail: Any = "") -> None:
    CALLS.append((role, name, detail))


def block_keys(tokens: list[int], salt: str | None, lora: str | None, n_blocks: int):
    """Chained content keys for the first n_blocks full blocks."""
    keys, h = [], hashlib.sha256(f"{salt}|{lora}".encode()).hexdigest()
    for i in range(n_blocks):
        blk = tokens[i * BLOCK:(i + 1) * BLOCK]
        h = hashlib.sha256((h + ",".join(map(str, blk))).encode()).hexdigest()
        keys.append(h)
    return keys


@dataclass
class ProbeMeta(KVConnectorMetadata):
    # plain data only (would be pickled to workers with TP>1)
    loads: list[dict] = field(default_factory=list)   # req_id, keys, block_ids, async
    saves: list[dict] = field(default_factory=list)   # req_id, keys, block_ids
    preempted: list[str] = field(default_factory=list)


class ProbeConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config, role, kv_cache_config=None):
        super().__init__(vllm_config, role, kv_cache_config)
        self.r = "S" if role == KVConnectorRole.SCHEDULER else "W"
        _rec(self.r, "__init__", role.name)
        # scheduler side
        self.reqs: dict[str, Any] = {}
        self.saved_upto: dict[str, int] = {}        # req_id -> blocks queued for save
        self.pending_loads: list[dict] = []
        self.delay_free = False
        self.force_async = False
        self.max_hit: int | None = None
        self.async_req: dict[str, bool] = {}
        # worker side
        self.kv_caches: dict[str, torch.Tensor] = {}
        self.finished_recv: set[str] = set()
        self.held_recv: set[str] = set()
        self.bad_blocks: set[int] = set()
        self.sending: set[str] = set()

    # ---------------- scheduler side ----------------
    @property
    def requires_kv_delivery(self) -> bool:
        return False

    def _key_info(self, request):
        lora = request.lora_request.lora_name if request.lora_request else None
        return request.cache_salt, lora

    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        self.reqs[request.request_id] = request
        salt, lora = self._key_info(request)
        toks = list(request.prompt_token_ids)
        # a sync load must leave the last prompt token to compute
        limit_blocks = (len(toks) - 1) // BLOCK
        keys = block_keys(toks, salt, lora, limit_blocks)
        hit = 0
        for k in keys:
            if k not in STORE:
                break
            hit += 1
        hit_tokens = hit * BLOCK
        if self.max_hit is not None:
            hit_tokens = min(hit_tokens, self.max_hit)
        n = max(0, hit_tokens - num_computed_tokens)
        is_async = self.force_async and n > 0
        self.async_req[request.request_id] = is_async
        _rec("S", "get_num_new_matched_tokens",
             (request.request_id, num_computed_tokens, n, is_async))
        return n, is_async

    def update_state_after_alloc(self, request, blocks, num_external_tokens):
        ids = blocks.get_block_ids()[0] if num_external_tokens else []
        _rec("S", "update_state_after_alloc",
             (request.request_id, num_external_tokens, list(ids)))
        if num_external_tokens == 0:
            return
        nc = request.num_computed_tokens  # local prefix hit (block aligned)
        first, last = nc // BLOCK, (nc + num_external_tokens) // BLOCK
        salt, lora = self._key_info(request)
        keys = block_keys(list(request.prompt_token_ids), salt, lora, last)
        self.pending_loads.append(dict(
            req_id=request.request_id, keys=keys[first:last],
            block_ids=list(ids[first:last]),
            is_async=self.async_req.get(request.request_id, False)))
        # loaded blocks are already in the store: never re-save them
        self.saved_upto[request.request_id] = last

    def build_connector_meta(self, scheduler_output):
        meta = ProbeMeta(loads=self.pending_loads,
                         preempted=sorted(scheduler_output.preempted_req_ids or ()))
        self.pending_loads = []
        blocks_of: dict[str, list[int]] = {}
        for nr in scheduler_output.scheduled_new_reqs:
            blocks_of[nr.req_id] = list(nr.block_ids[0])
        cr = scheduler_output.scheduled_cached_reqs
        for i, rid in enumerate(cr.req_ids):
            req = self.reqs.get(rid)
            if req is None:
                continue
            # (re)read the full block table from the request's manager view
            blocks_of[rid] = None
        for rid in scheduler_output.preempted_req_ids or ():
            self.saved_upto.pop(rid, None)
        for rid, n in scheduler_output.num_scheduled_tokens.items():
            req = self.reqs.get(rid)
            if req is None:
                continue
            bids = blocks_of.get(rid)
            if bids is None:
                bids = list(self._kv_cache_manager.get_block_ids(rid)[0])
            # num_computed_tokens already includes this step's tokens
            done_tokens = min(req.num_computed_tokens, req.num_prompt_tokens)
            full = done_tokens // BLOCK
            start = self.saved_upto.get(rid, 0)
            if full > start:
                salt, lora = self._key_info(req)
                keys = block_keys(list(req.prompt_token_ids), salt, lora, full)
                meta.saves.append(dict(req_id=rid, keys=keys[start:full],
                                       block_ids=bids[start:full]))
                self.saved_upto[rid] = full
        _rec("S", "build_connector_meta",
             dict(loads=[(d["req_id"], len(d["keys"]), d["is_async"]) for d in meta.loads],
                  saves=[(d["req_id"], len(d["keys"])) for d in meta.saves],
                  preempted=meta.preempted))
        return meta

    def request_finished(self, request, block_ids):
        _rec("S", "request_finished", (request.request_id, list(block_ids),
                                       self.delay_free))
        self.reqs.pop(request.request_id, None)
        self.saved_upto.pop(request.request_id, None)
        return self.delay_free, None

    def update_connector_output(self, connector_output):
        if not connector_output.is_empty():
            _rec("S", "update_connector_output",
                 (sorted(connector_output.finished_sending or ()),
                  sorted(connector_output.finished_recving or ()),
                  sorted(connector_output.invalid_block_ids)))

    # ---------------- worker side ----------------
    def register_kv_caches(self, kv_caches):
        self.kv_caches = dict(kv_caches)
        _rec("W", "register_kv_caches",
             {k: (tuple(v.shape), tuple(v.stride()), str(v.dtype))
              for k, v in list(kv_caches.items())[:1]})

    def handle_preemptions(self, kv_connector_metadata):
        _rec("W", "handle_preemptions", list(kv_connector_metadata.preempted))

    def start_load_kv(self, forward_context, **kwargs):
        meta = self._get_connector_metadata()
        _rec("W", "start_load_kv", (type(forward_context).__name__,
                                    sorted(kwargs), len(meta.loads)))
        for ld in meta.loads:
            for key, bid in zip(ld["keys"], ld["block_ids"]):
                if key in CORRUPT or key not in STORE:
                    self.bad_blocks.add(bid)
                    continue
                for layer, t in self.kv_caches.items():
                    t[bid].copy_(STORE[key][layer])
            if ld["is_async"]:
                if HOLD_ASYNC.get(ld["req_id"]):
                    self.held_recv.add(ld["req_id"])
                else:
                    self.finished_recv.add(ld["req_id"])

    def wait_for_layer_load(self, layer_name):
        _rec("W", "wait_for_layer_load", layer_name)

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs):
        meta = self._get_connector_metadata()
        for sv in meta.saves:
            for key, bid in zip(sv["keys"], sv["block_ids"]):
                STORE.setdefault(key, {})[layer_name] = kv_layer[bid].clone()
        _rec("W", "save_kv_layer", (layer_name, len(meta.saves)))

    def wait_for_save(self):
        _rec("W", "wait_for_save")

    def get_finished(self, finished_req_ids):
        # release held async loads the harness cleared
        for rid in list(self.held_recv):
            if not HOLD_ASYNC.get(rid):
                self.held_recv.discard(rid)
                self.finished_recv.add(rid)
        recv, self.finished_recv = self.finished_recv, set()
        send = set(finished_req_ids) if self.delay_free_worker else set()
        _rec("W", "get_finished", (sorted(finished_req_ids), sorted(send), sorted(recv)))
        return (send or None), (recv or None)

    delay_free_worker = False

    def get_block_ids_with_load_errors(self):
        bad, self.bad_blocks = self.bad_blocks, set()
        if bad:
            _rec("W", "get_block_ids_with_load_errors", sorted(bad))
        return bad


# ----------------------------------------------------------------------------
# Harness (the part kvrt's tests keep)
# ----------------------------------------------------------------------------
TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": len(LAYERS),
    "head_dim": 16,
    "vocab_size": 512,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "torch_dtype": "float32",
    "dtype": "float32",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
}
EOS = 2
NUM_KV_HEADS, HEAD = 2, 16


def make_model_dir() -> str:
    d = tempfile.mkdtemp(prefix="kvrt-tiny-llama-")
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(TINY_LLAMA, f)
    return d


def make_vllm_config(model_dir, *, policy="recompute", prefix_caching=False,
                     max_batched=64, layout="LBNHC", kv_role="kv_both"):
    from vllm.config import (CacheConfig, DeviceConfig, KVTransferConfig,
                             ModelConfig, SchedulerConfig, VllmConfig)
    model_config = ModelConfig(model=model_dir, tokenizer=model_dir,
                               skip_tokenizer_init=True, dtype="float32",
                               seed=0, max_model_len=1024)
    sched = SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=max_batched,
                            max_model_len=1024, enable_chunked_prefill=True,
                            is_encoder_decoder=False, async_scheduling=False,
                            disable_hybrid_kv_cache_manager=True)
    cache = CacheConfig(block_size=BLOCK, enable_prefix_caching=prefix_caching)
    cache.kv_cache_layout = layout
    kvt = KVTransferConfig(kv_connector="ProbeConnector",
                           kv_connector_module_path="vllm_probe",
                           kv_role=kv_role, kv_load_failure_policy=policy,
                           kv_buffer_device="cpu")
    return VllmConfig(model_config=model_config, scheduler_config=sched,
                      cache_config=cache, kv_transfer_config=kvt,
                      device_config=DeviceConfig("cpu"))


def make_kv_cache_config(vllm_config, num_blocks):
    from vllm.v1.core.kv_cache_planning import get_kv_cache_config_from_groups
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheGroupSpec
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=NUM_KV_HEADS,
                             head_size=HEAD, dtype=torch.float32)
    groups = [KVCacheGroupSpec(list(LAYERS), spec)]
    mem = spec.page_size_bytes * len(LAYERS) * num_blocks
    return get_kv_cache_config_from_groups(vllm_config, groups, mem)


class Engine:
    """Scheduler + one CPU worker, stepping like EngineCore.step()."""

    def __init__(self, model_dir, num_blocks=64, **cfg):
        from vllm.distributed.kv_transfer import kv_transfer_state
        from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
        from vllm.utils.hashing import sha256
        from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
        from vllm.v1.core.sched.scheduler import Scheduler
        from vllm.v1.structured_output import StructuredOutputManager
        from vllm.v1.worker.utils import allocate_kv_cache

        self.vc = make_vllm_config(model_dir, **cfg)
        self.kvc = make_kv_cache_config(self.vc, num_blocks)
        self.vc.cache_config.num_gpu_blocks = self.kvc.num_blocks
        init_none_hash(sha256)
        self.hasher = get_request_block_hasher(BLOCK, sha256)
        self.sched = Scheduler(vllm_config=self.vc, kv_cache_config=self.kvc,
                               structured_output_manager=StructuredOutputManager(self.vc),
                               block_size=BLOCK, log_stats=True)
        self.sc: ProbeConnector = self.sched.get_kv_connector()
        # worker: same factory, role WORKER; vLLM's real worker-side glue
        kv_transfer_state._KV_CONNECTOR_AGENT = None
        self.wc = KVConnectorFactory.create_connector(
            self.vc, KVConnectorRole.WORKER, self.kvc)
        kv_transfer_state._KV_CONNECTOR_AGENT = self.wc
        layout = self.vc.cache_config.get_resolved_kv_cache_layout()
        self.kv = allocate_kv_cache(self.kvc, torch.device("cpu"), layout)
        from vllm.v1.worker.gpu.kv_connector import ActiveKVConnector
        self.glue = ActiveKVConnector(self.vc, self.kv)
        # worker-side request state (what the model runner tracks)
        self.wreq: dict[str, dict] = {}
        self.step_no = 0
        self.log: list[str] = []
        self.sent_tokens = 7

    # --- requests ---
    def add(self, rid, prompt, max_tokens=3, cache_salt=None, lora=None):
        from vllm import SamplingParams
        from vllm.v1.request import Request
        sp = SamplingParams(max_tokens=max_tokens)
        sp.update_from_generation_config({}, EOS)
        req = Request(request_id=rid, prompt_token_ids=list(prompt),
                      sampling_params=sp, pooling_params=None,
                      cache_salt=cache_salt, lora_request=lora,
                      block_hasher=self.hasher)
        self.sched.add_request(req)
        return req

    # --- fake model ---
    @staticmethod
    def kv_value(layer_idx, tok, pos):
        return float(layer_idx * 100000 + pos * 1000 + tok % 1000)

    def _forward(self, so):
        """Write KV for every scheduled token; per-layer connector hooks."""
        for li, name in enumerate(LAYERS):
            self.wc.wait_for_layer_load(name)
            t = self.kv[name]
            for rid, n in so.num_scheduled_tokens.items():
                st = self.wreq[rid]
                req = self.sched.requests[rid]
                end = req.num_computed_tokens     # already advanced by schedule()
                for pos in range(end - n, end):
                    bid = st["blocks"][pos // BLOCK]
                    t[bid, :, pos % BLOCK, :] = self.kv_value(li, req.all_token_ids[pos], pos)
            self.wc.save_kv_layer(name, t, attn_metadata=None)

    def _update_worker_state(self, so):
        for rid in so.finished_req_ids:
            self.wreq.pop(rid, None)
        for rid in so.preempted_req_ids or ():
            self.wreq.pop(rid, None)
        zero = so.new_block_ids_to_zero or []
        for nr in so.scheduled_new_reqs:
            self.wreq[nr.req_id] = dict(tokens=list(nr.prompt_token_ids),
                                        blocks=list(nr.block_ids[0]),
                                        computed=nr.num_computed_tokens)
            zero += list(nr.block_ids[0])[nr.num_computed_tokens // BLOCK:]
        cr = so.scheduled_cached_reqs
        for i, rid in enumerate(cr.req_ids):
            nb = cr.new_block_ids[i]
            if rid in cr.resumed_req_ids:
                toks = cr.all_token_ids.get(rid) or self.sched.requests[rid].all_token_ids
                self.wreq[rid] = dict(tokens=list(toks), blocks=list(nb[0]),
                                      computed=cr.num_computed_tokens[i])
            else:
                if nb is not None:
                    self.wreq[rid]["blocks"] += list(nb[0])
                    zero += list(nb[0])
                self.wreq[rid]["computed"] = cr.num_computed_tokens[i]
        # freshly allocated blocks hold stale bytes: zero them so a test can
        # tell a real load from leftovers (vLLM zeroes new_block_ids_to_zero)
        for bid in set(zero):
            for t in self.kv.values():
                t[bid].zero_()

    def step(self, hold_output_for: set[str] = frozenset()):
        from vllm.v1.outputs import ModelRunnerOutput
        so = self.sched.schedule()
        self.step_no += 1
        self._update_worker_state(so)
        sched = dict(so.num_scheduled_tokens)
        if so.total_num_scheduled_tokens == 0:
            mro = self.glue.no_forward(so)
        else:
            self.glue.pre_forward(so)          # handle_preemptions, bind, sync loads
            self._forward(so)
            self.glue.finish_forward()
            kvo = self.glue.post_forward(so.finished_req_ids)
            req_ids = list(sched)
            sampled = []
            for rid in req_ids:
                req = self.sched.requests[rid]
                if req.num_computed_tokens >= req.num_tokens:
                    sampled.append([self.sent_tokens])
                else:
                    sampled.append([])          # chunked prefill: no token
            mro = ModelRunnerOutput(req_ids=req_ids,
                                    req_id_to_index={r: i for i, r in enumerate(req_ids)},
                                    sampled_token_ids=sampled,
                                    kv_connector_output=kvo)
        kvo = mro.kv_connector_output
        eco = self.sched.update_from_output(so, mro)
        fin = []
        for outs in eco.values():
            for o in outs.outputs:
                if o.finish_reason is not None:
                    fin.append((o.request_id, str(o.finish_reason)))
        line = (f"step {self.step_no:2d}: scheduled={sched} "
                f"computed_before={{{', '.join(f'{r}:{self.sched.requests[r].num_computed_tokens - sched[r]}' for r in sched if r in self.sched.requests)}}} "
                f"preempted={sorted(so.preempted_req_ids or ())} "
                f"recving={sorted(kvo.finished_recving or ()) if kvo else []} "
                f"sending={sorted(kvo.finished_sending or ()) if kvo else []} "
                f"invalid={sorted(kvo.invalid_block_ids) if kvo else []} "
                f"finished={fin} "
                f"status={ {r: q.status.name for r, q in self.sched.requests.items()} }")
        self.log.append(line)
        print("   ", line)
        return so, sched

    def run(self, max_steps=50):
        steps = []
        while self.sched.has_requests() and max_steps:
            steps.append(self.step()[1])
            max_steps -= 1
        return steps

    # --- leak check (as vLLM's tests/v1/kv_connector/unit/utils.py) ---
    def assert_empty(self):
        s = self.sched
        assert len(s.requests) == 0, s.requests.keys()
        assert len(s.waiting) == 0 and len(s.running) == 0
        assert len(s.finished_req_ids) == 0
        assert len(s.finished_recving_kv_req_ids) == 0
        m = s.kv_cache_manager
        stm = m.coordinator.single_type_managers[0]
        assert len(stm.req_to_blocks) == 0, stm.req_to_blocks
        assert len(stm.num_cached_block) == 0
        bp = m.block_pool
        assert bp.free_block_queue.num_free_blocks == bp.num_gpu_blocks - 1
        bad = [b.block_id for b in bp.blocks if b.ref_cnt != 0]
        assert not bad, f"blocks with ref_cnt>0: {bad}"


def check(cond, msg):
    print(("    OK  " if cond else "    FAIL ") + msg)
    if not cond:
        FAILURES.append(msg)


FAILURES: list[str] = []


def prompt(seed, n=40):
    return [(seed * 31 + i * 7) % 400 + 10 for i in range(n)]


def verify_loaded(eng, rid, ntokens):
    """KV of the first ntokens of rid (in its blocks) equals the fake model's."""
    st = eng.wreq[rid]
    for li, name in enumerate(LAYERS):
        t = eng.kv[name]
        for pos in range(ntokens):
            v = t[st["blocks"][pos // BLOCK], :, pos % BLOCK, :]
            tok = eng.sched.requests[rid].all_token_ids[pos]
            if not torch.all(v == eng.kv_value(li, tok, pos)):
                return False
    return True


# ----------------------------------------------------------------------------
def scenario_sync_hit(model_dir):
    print("\n== A. sync hit: 2nd request schedules only the uncached tail")
    STORE.clear(); CALLS.clear()
    eng = Engine(model_dir)
    P = prompt(1)
    eng.add("A", P)
    eng.run()
    check(len(STORE) == 2, f"A saved its 2 full prompt blocks (store={len(STORE)})")
    CALLS.clear()
    eng.add("B", P)
    so, sched = eng.step()
    check(sched == {"B": 8}, f"B first step schedules 40-32=8 tokens: {sched}")
    check(so.has_sync_kv_loads, "SchedulerOutput.has_sync_kv_loads is True")
    check(verify_loaded(eng, "B", 32), "B's new blocks hold A's KV for tokens 0..31 (real load)")
    eng.run()
    print("    connector calls (B):")
    for c in CALLS:
        if c[1] not in ("wait_for_layer_load", "save_kv_layer", "wait_for_save"):
            print("      ", c)
    eng.add("C", P, cache_salt="other-tenant")
    so, sched = eng.step()
    check(sched == {"C": 40}, f"different cache_salt isolates: C schedules all 40: {sched}")
    eng.run()
    eng.assert_empty(); check(True, "no leaks (requests, blocks, ref counts)")


def scenario_async(model_dir):
    print("\n== B. async load via WAITING_FOR_REMOTE_KVS")
    STORE.clear(); CALLS.clear(); HOLD_ASYNC.clear()
    eng = Engine(model_dir)
    P = prompt(2)
    eng.add("A", P); eng.run()
    eng.sc.force_async = True
    HOLD_ASYNC["B"] = True
    eng.add("B", P)
    so, sched = eng.step()
    st = eng.sched.requests["B"].status.name
    check(sched == {} and st == "WAITING_FOR_REMOTE_KVS", f"B not scheduled, status {st}")
    so, sched = eng.step()
    check(sched == {}, "B still waiting while the worker holds finished_recving")
    HOLD_ASYNC["B"] = False
    so, sched = eng.step()   # worker reports finished_recving
    so, sched = eng.step()   # scheduler promotes B and schedules the tail
    check(sched == {"B": 8}, f"after finished_recving B schedules 8-token tail: {sched}")
    check(verify_loaded(eng, "B", 32), "B's blocks hold loaded KV")
    eng.run(); eng.assert_empty(); check(True, "no leaks")

    print("\n== B2. abort during async load (blocks held until finished_recving)")
    HOLD_ASYNC["D"] = True
    eng.add("D", P)
    eng.step()
    from vllm.v1.request import RequestStatus
    eng.sched.finish_requests("D", RequestStatus.FINISHED_ABORTED)
    used = [b.block_id for b in eng.sched.kv_cache_manager.block_pool.blocks if b.ref_cnt]
    check(len(used) == 2, f"aborted D's 2 load blocks stay held: {used}")
    HOLD_ASYNC["D"] = False
    eng.step(); eng.step()
    eng.assert_empty(); check(True, "after the late finished_recving: no leaks")


def scenario_load_error(model_dir):
    print("\n== C. corrupted chunk -> invalid_block_ids -> recompute")
    STORE.clear(); CALLS.clear(); CORRUPT.clear()
    eng = Engine(model_dir, policy="recompute")
    P = prompt(3)
    eng.add("A", P); eng.run()
    keys = block_keys(P, None, None, 2)
    CORRUPT.add(keys[1])            # second block fails to load
    eng.add("B", P)
    so, s1 = eng.step()
    so, s2 = eng.step()
    print("    ", [c for c in CALLS if c[1] == "get_block_ids_with_load_errors"])
    check(s1 == {"B": 8}, f"step1 B loads 32 and schedules 8: {s1}")
    check(s2 == {"B": 24}, f"step2 B recomputes from the bad block: 16..39 = 24 tokens: {s2}")
    eng.run(); eng.assert_empty(); check(True, "no leaks")

    print("\n== C2. same with policy 'fail'")
    STORE.clear(); CORRUPT.clear()
    eng = Engine(model_dir, policy="fail")
    eng.add("A", P); eng.run()
    CORRUPT.add(keys[0])
    eng.add("B", P)
    eng.step()
    check("B" not in eng.sched.requests, "policy fail: B finished with an error")
    eng.run(); eng.assert_empty(); check(True, "no leaks")


def scenario_preemption(model_dir):
    print("\n== D. preemption, resume (reload from connector), no leaks")
    STORE.clear(); CALLS.clear()
    eng = Engine(model_dir, num_blocks=9)   # 8 usable blocks = 128 tokens
    eng.add("A", prompt(4), max_tokens=40)
    eng.add("B", prompt(5), max_tokens=40)
    eng.run(max_steps=200)
    pre = [c for c in CALLS if c[1] == "handle_preemptions" and c[2]]
    gm = [c for c in CALLS if c[1] == "get_num_new_matched_tokens"]
    print("    handle_preemptions with ids:", pre[:3])
    print("    get_num_new_matched_tokens:", gm)
    check(bool(pre), "a preemption happened and reached handle_preemptions")
    check(any(c[2][2] > 0 for c in gm), "resumed request got a connector hit")
    eng.assert_empty(); check(True, "no leaks")


def scenario_delay_free(model_dir):
    print("\n== E. delay_free + finished_sending")
    STORE.clear(); CALLS.clear()
    eng = Engine(model_dir)
    eng.sc.delay_free = True
    eng.wc.delay_free_worker = True
    eng.add("A", prompt(6))
    eng.run()   # worker reports finished_sending when it sees A finished
    snd = [c for c in CALLS if c[1] == "get_finished" and c[2][1]]
    check(bool(snd), f"worker reported finished_sending: {snd}")
    eng.assert_empty(); check(True, "no leaks after finished_sending")


def scenario_worker_direct(model_dir):
    print("\n== F. worker connector driven directly (no vLLM glue)")
    from vllm.forward_context import get_forward_context, set_forward_context
    eng = Engine(model_dir)
    w = eng.wc
    meta = ProbeMeta()
    w.bind_connector_metadata(meta)
    with set_forward_context(None, eng.vc):
        fc = get_forward_context()
        w.start_load_kv(fc)
        print("     ForwardContext fields:", type(fc).__name__,
              "no_compile_layers=", len(fc.no_compile_layers), "attn_metadata=", fc.attn_metadata)
    for n in LAYERS:
        w.wait_for_layer_load(n); w.save_kv_layer(n, eng.kv[n], None)
    w.wait_for_save()
    print("     get_finished ->", w.get_finished(set()))
    print("     get_transfer_results ->", w.get_transfer_results(set()))
    w.clear_connector_metadata()
    for name, t in list(eng.kv.items())[:1]:
        print(f"     kv[{name}] shape={tuple(t.shape)} stride={t.stride()} dtype={t.dtype}")
    check(True, "worker-side calls work on CPU tensors")


def scenario_layouts(model_dir):
    print("\n== G. per-layer CPU views for each KVCacheLayout")
    from vllm.v1.kv_cache_layout import KVCacheLayout
    for lay in KVCacheLayout:
        try:
            eng = Engine(model_dir, layout=lay.name, num_blocks=8)
            t = eng.kv[LAYERS[0]]
            print(f"     {lay.name}: shape={tuple(t.shape)} stride={t.stride()} "
                  f"contiguous={t.is_contiguous()} shared_storage="
                  f"{eng.kv[LAYERS[0]].untyped_storage().data_ptr() == eng.kv[LAYERS[1]].untyped_storage().data_ptr()}")
        except Exception as e:  # noqa: BLE001
            print(f"     {lay.name}: {type(e).__name__}: {e}")


def main():
    t0 = time.time()
    import vllm
    from vllm.platforms import current_platform
    print(f"vllm {vllm.__version__}  torch {torch.__version__}  "
          f"platform={type(current_platform).__name__} device_type={current_platform.device_type!r}")
    model_dir = make_model_dir()
    scenarios = [scenario_sync_hit, scenario_async, scenario_load_error,
                 scenario_preemption, scenario_delay_free, scenario_worker_direct,
                 scenario_layouts]
    only = sys.argv[1:]
    for sc in scenarios:
        if only and not any(o in sc.__name__ for o in only):
            continue
        try:
            sc(model_dir)
        except Exception as e:  # noqa: BLE001
            import traceback
            traceback.print_exc()
            FAILURES.append(f"{sc.__name__}: {type(e).__name__}: {e}")
    print(f"\n{len(FAILURES)} failure(s); {time.time() - t0:.1f}s")
    for f in FAILURES:
        print("  -", f)
    return 1 if FAILURES else 0


if __name__ == "__main__":
    # vLLM's factory imports this file again as module "vllm_probe"; run
    # everything inside that module so STORE/CALLS are the connector's.
    import vllm_probe
    sys.exit(vllm_probe.main())
