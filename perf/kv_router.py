#!/usr/bin/env python3
"""An example KV-aware router over vLLM's KV events (kvrt's tiers and
vLLM's GPU blocks): which instance holds the longest prefix of a prompt,
and in which tier.

    python perf/kv_router.py A=ipc:///run/a/kv B=tcp://10.0.0.2:5557 \\
        --prompt-ids ids.json            # a JSON list of token ids
    (subscribes, listens --listen seconds, prints the answer as JSON)

As a library: r = Router({"A": endpoint, ...}); r.best(token_ids) ->
{"instance": "A", "medium": "CPU", "tokens": 512} (instance None: no
instance holds any of it); r.close().

Each instance's index is built from its BlockStored / BlockRemoved /
AllBlocksCleared stream (vLLM's publisher: ZMQ multipart topic, sequence,
msgpack KVEventBatch). A block is known by its hash and reached from its
parent's hash and its token ids, so a prompt is walked block by block
without vLLM's hash function. Media as kvrt and vLLM publish them: GPU
(vLLM's block pool), CPU (kvrt's CPU pool), STORAGE/LOCAL (kvrt's disk
tier), STORAGE/REMOTE (Redis, shared by the instances on it).
AllBlocksCleared is vLLM's GPU prefix cache reset: kvrt reports its own
removals block by block. Ties go to the faster tier: GPU, CPU, disk,
Redis. Needs pyzmq and msgspec (both come with vLLM), not vLLM itself.

Threads: one subscriber thread per instance; best() from any thread.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time

import msgspec
import zmq

# Faster first: the tier a request would load from.
TIERS = [("GPU", None), ("CPU", None), ("CPU", "LOCAL"), ("STORAGE", "LOCAL"),
         ("STORAGE", None), ("STORAGE", "REMOTE")]


def tier_rank(medium) -> int:
    return TIERS.index(medium) if medium in TIERS else len(TIERS)


class PrefixIndex:
    """One instance's blocks: hash -> media holding it; (parent hash, token
    ids) -> hash. Updated by one thread, read under the lock."""

    def __init__(self):
        self.lock = threading.Lock()
        self.media: dict = {}     # block hash -> set of (medium, locality)
        self.child: dict = {}     # (parent hash, tokens) -> block hash
        self.key_of: dict = {}    # block hash -> its (parent, tokens) key
        self.events = 0

    def apply(self, ev: dict) -> None:
        typ = ev.get("type")
        with self.lock:
            self.events += 1
            if typ == "BlockStored":
                medium = (ev.get("medium") or "GPU", ev.get("locality"))
                bs, toks = ev["block_size"], ev["token_ids"]
                parent = ev.get("parent_block_hash")
                for j, h in enumerate(ev["block_hashes"]):
                    k = (parent, tuple(toks[j * bs:(j + 1) * bs]))
                    self.child[k] = h
                    self.key_of[h] = k
                    self.media.setdefault(h, set()).add(medium)
                    parent = h
            elif typ == "BlockRemoved":
                medium = (ev.get("medium") or "GPU", ev.get("locality"))
                for h in ev["block_hashes"]:
                    m = self.media.get(h)
                    if m is not None:
                        m.discard(medium)
                        if not m:
                            self._forget(h)
            elif typ == "AllBlocksCleared":  # vLLM's GPU prefix cache reset
                for h in [h for h, m in self.media.items() if ("GPU", None) in m]:
                    self.media[h].discard(("GPU", None))
                    if not self.media[h]:
                        self._forget(h)

    def _forget(self, h) -> None:
        del self.media[h]
        k = self.key_of.pop(h, None)
        if k is not None and self.child.get(k) == h:
            del self.child[k]

    def longest(self, tokens: list, block_size: int) -> dict:
        """medium -> tokens of the longest prefix held there (whole blocks
        in a row from the first)."""
        depth: dict = {}
        parent = None
        with self.lock:
            for i in range(len(tokens) // block_size):
                h = self.child.get((parent, tuple(tokens[i * block_size:(i + 1) * block_size])))
                m = self.media.get(h) if h is not None else None
                if not m:
                    break
                for medium in m:  # held in a row from the first block
                    if depth.get(medium, 0) == i:
                        depth[medium] = i + 1
                parent = h
        return {medium: d * block_size for medium, d in depth.items()}


class Router:
    def __init__(self, endpoints: dict):
        self.ctx = zmq.Context()
        self.index = {name: PrefixIndex() for name in endpoints}
        self.block_size: dict = {}
        self.stop = threading.Event()
        self.threads = []
        for name, ep in endpoints.items():
            s = self.ctx.socket(zmq.SUB)
            s.setsockopt(zmq.SUBSCRIBE, b"")
            s.connect(ep)
            t = threading.Thread(target=self._listen, args=(name, s), daemon=True)
            t.start()
            self.threads.append(t)

    def _listen(self, name: str, sock) -> None:
        idx = self.index[name]
        while not self.stop.is_set():
            if not sock.poll(100):
                continue
            parts = sock.recv_multipart()
            try:
                batch = msgspec.msgpack.decode(parts[-1])
                events = batch[1] if isinstance(batch, list) else batch.get("events", [])
            except (msgspec.DecodeError, IndexError, AttributeError):
                continue  # not a KVEventBatch: ignored
            for ev in events:
                if isinstance(ev, dict):
                    if ev.get("type") == "BlockStored":
                        self.block_size[name] = ev["block_size"]
                    idx.apply(ev)
        sock.close(0)

    def holdings(self, tokens: list) -> dict:
        """instance -> {medium: tokens of its longest prefix there}."""
        out = {}
        for name, idx in self.index.items():
            bs = self.block_size.get(name)
            if bs:
                out[name] = idx.longest(tokens, bs)
        return out

    def best(self, tokens: list) -> dict:
        best = {"instance": None, "medium": None, "locality": None, "tokens": 0}
        for name, by_medium in self.holdings(tokens).items():
            for medium, n in by_medium.items():
                cur = (best["tokens"], -tier_rank((best["medium"], best["locality"])))
                if (n, -tier_rank(medium)) > cur:
                    best = {"instance": name, "medium": medium[0], "locality": medium[1],
                            "tokens": n}
        return best

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()
        self.ctx.term()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("endpoints", nargs="+", help="NAME=ZMQ endpoint of an instance's publisher")
    ap.add_argument("--prompt-ids", required=True, help="a JSON file: a list of token ids")
    ap.add_argument("--listen", type=float, default=5.0, help="seconds of events to gather")
    a = ap.parse_args(argv)
    eps = dict(e.split("=", 1) for e in a.endpoints)
    tokens = json.load(open(a.prompt_ids))
    r = Router(eps)
    time.sleep(a.listen)
    print(json.dumps({"best": r.best(tokens), "holdings": {
        n: {f"{m[0]}/{m[1] or '-'}": t for m, t in h.items()}
        for n, h in r.holdings(tokens).items()}}))
    r.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
