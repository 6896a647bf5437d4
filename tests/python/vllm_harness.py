"""Harness that drives vLLM's REAL v1 Scheduler and the worker-side KV
connector on CPU tensors (the recipe: VLLM-RECIPE.md).

Import this only after the environment is set (conftest.py does it).
"""

from __future__ import annotations

import json
import os
import tempfile

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

BLOCK = 16
LAYERS = ["model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"]
CONNECTOR = ("KvrtConnectorV1", "kvrt.vllm")
EXTRA: dict = {}

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
                     max_batched=64, layout="LBNHC", kv_role="kv_both",
                     extra=None, max_seqs=16, kv_events=None):
    """kv_events: an endpoint (ipc://...) where vLLM publishes KV events."""
    from vllm.config import (CacheConfig, DeviceConfig, KVTransferConfig,
                             ModelConfig, SchedulerConfig, VllmConfig)
    model_config = ModelConfig(model=model_dir, tokenizer=model_dir,
                               skip_tokenizer_init=True, dtype="float32",
                               seed=0, max_model_len=1024)
    sched = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=max_batched,
                            max_model_len=1024, enable_chunked_prefill=True,
                            is_encoder_decoder=False, async_scheduling=False,
                            disable_hybrid_kv_cache_manager=True)
    cache = CacheConfig(block_size=BLOCK, enable_prefix_caching=prefix_caching)
    cache.kv_cache_layout = layout
    kvt = KVTransferConfig(kv_connector=CONNECTOR[0],
                           kv_connector_module_path=CONNECTOR[1],
                           kv_connector_extra_config=dict(extra or EXTRA),
                           kv_role=kv_role, kv_load_failure_policy=policy,
                           kv_buffer_device="cpu")
    events = {}
    if kv_events:
        from vllm.config import KVEventsConfig
        events["kv_events_config"] = KVEventsConfig(enable_kv_cache_events=True,
                                                    publisher="zmq", endpoint=kv_events)
    return VllmConfig(model_config=model_config, scheduler_config=sched,
                      cache_config=cache, kv_transfer_config=kvt,
                      device_config=DeviceConfig("cpu"), **events)


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

    def __init__(self, model_dir, num_blocks=64, keep_local=False, **cfg):
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
        self.sc = self.sched.get_kv_connector()
        # vLLM's own prefix cache (prefix_caching=True): unless keep_local,
        # add() empties it first when nothing holds blocks, so a repeated
        # prompt is served by kvrt, not by vLLM's blocks; keep_local leaves
        # it, for partial local hits followed by kvrt's chunks.
        self.prefix_caching = bool(cfg.get("prefix_caching"))
        self.keep_local = keep_local
        # The local hit each lookup was given (vLLM's block-aligned local
        # prefix-cache hit): blocks past it hold garbage on a real device.
        self.local_hit: dict[str, int] = {}
        orig = self.sc.get_num_new_matched_tokens

        def lookup(req, n):
            out = orig(req, n)
            # An async load wrote its blocks while the request waited:
            # those are not zeroed when it is scheduled.
            self.local_hit[req.request_id] = None if out[0] and out[1] else n
            return out

        self.sc.get_num_new_matched_tokens = lookup
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
        if self.prefix_caching and not self.keep_local:
            self.settle()  # finished requests whose saves still copy hold blocks
            if not self.sched.has_requests():
                self.drop_local()
        sp = SamplingParams(max_tokens=max_tokens)
        sp.update_from_generation_config({}, EOS)
        req = Request(request_id=rid, prompt_token_ids=list(prompt),
                      sampling_params=sp, pooling_params=None,
                      cache_salt=cache_salt, lora_request=lora,
                      block_hasher=self.hasher)
        self.sched.add_request(req)
        return req

    def drop_local(self):
        """Empty vLLM's own prefix cache (not kvrt's), once finished
        requests whose saves still copy have let their blocks go."""
        self.settle()
        return self.sched.kv_cache_manager.reset_prefix_cache()

    def local_cached_blocks(self):
        """Blocks vLLM's prefix cache holds (a hash), by id."""
        return {b.block_id for b in self.sched.kv_cache_manager.block_pool.blocks
                if getattr(b, "block_hash", None) is not None}

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
        # Every block past vLLM's local hit is zeroed (what a real device
        # would hold there is garbage): only kvrt's load or the forward can
        # make it right, so verify_loaded tells a real load from leftovers.
        for nr in so.scheduled_new_reqs:
            self.wreq[nr.req_id] = dict(tokens=list(nr.prompt_token_ids),
                                        blocks=list(nr.block_ids[0]),
                                        computed=nr.num_computed_tokens)
            local = self.local_hit.get(nr.req_id, 0)
            if local is None:
                local = nr.num_computed_tokens
            zero += list(nr.block_ids[0])[local // BLOCK:]
        cr = so.scheduled_cached_reqs
        for i, rid in enumerate(cr.req_ids):
            nb = cr.new_block_ids[i]
            if rid in cr.resumed_req_ids:
                toks = cr.all_token_ids.get(rid) or self.sched.requests[rid].all_token_ids
                self.wreq[rid] = dict(tokens=list(toks), blocks=list(nb[0]),
                                      computed=cr.num_computed_tokens[i])
                local = self.local_hit.get(rid, 0)
                if local is None:
                    local = cr.num_computed_tokens[i]
                zero += list(nb[0])[local // BLOCK:]
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
        if os.environ.get("KVRT_HARNESS_VERBOSE"):
            print("   ", line)
        return so, sched

    def run(self, max_steps=50):
        steps = []
        while self.sched.has_requests() and max_steps:
            steps.append(self.step()[1])
            max_steps -= 1
        return steps

    def close(self):
        self.sc.shutdown()
        self.wc.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    # --- leak check (as vLLM's tests/v1/kv_connector/unit/utils.py) ---
    def settle(self, seconds=10.0):
        """Empty steps while only finished requests remain, waiting for
        their saves (delay_free: finished_sending comes once the copies
        ran, later on a loaded machine); bounded in time."""
        import time
        s = self.sched
        t0 = time.monotonic()
        while (s.requests and all(r.is_finished() for r in s.requests.values())
               and time.monotonic() - t0 < seconds):
            self.step()
            time.sleep(0.002)
        if s.finished_req_ids:  # reported to the workers by one more step
            self.step()

    def assert_empty(self):
        self.settle()
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



def prompt(seed, n=40):
    return [(seed * 31 + i * 7) % 400 + 10 for i in range(n)]


def prompt_blocks(eng, tokens):
    """The blocks vLLM's prefix cache maps the full blocks of tokens to
    (None where it has none), by vLLM's own block hashes."""
    from vllm import SamplingParams
    from vllm.v1.request import Request
    sp = SamplingParams(max_tokens=1)
    sp.update_from_generation_config({}, EOS)
    r = Request(request_id="kvrt-probe", prompt_token_ids=list(tokens), sampling_params=sp,
                pooling_params=None, block_hasher=eng.hasher)
    pool = eng.sched.kv_cache_manager.block_pool
    out = []
    for h in r.block_hashes:
        b = pool.get_cached_block(h, [0])
        out.append(b[0].block_id if b else None)
    return out


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
