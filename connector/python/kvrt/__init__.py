"""kvrt: a KV cache for vLLM beyond GPU memory (C runtime + thin shim).

Importing this package does nothing else: the C library is loaded on the
first engine construction (kvrt._lib.lib()), and vLLM's connector class
lives in kvrt.vllm (kv_connector_module_path "kvrt.vllm").
"""

__all__ = ["vllm"]
