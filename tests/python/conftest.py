"""pytest setup for kvrt's vLLM tests: environment before vLLM is imported,
the kvrt package (connector/python) on sys.path, the library found through
KVRT_LIB or build/plain/libkvrt.so."""

import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))

for k, v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
             "DO_NOT_TRACK": "1", "VLLM_LOGGING_LEVEL": "WARNING", "KVRT_DEVICE": "host",
             "VLLM_CACHE_ROOT": os.path.join(tempfile.gettempdir(), "kvrt-vllm-probe-cache")}.items():
    os.environ.setdefault(k, v)
if "KVRT_LIB" not in os.environ:
    lib = os.path.join(REPO, "build", "plain", "libkvrt.so")
    if os.path.exists(lib):
        os.environ["KVRT_LIB"] = lib

for p in (os.path.join(REPO, "connector", "python"), HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

collect_ignore = ["vllm_probe.py", "vllm_harness.py"]
