/* actors/key.h: chunk keys, the names of cached KV.
 *
 * Owns nothing: pure functions, any thread, no allocation, no syscall.
 * The spec (encodings, test vectors) is docs/keys.md; in short:
 *
 *   ns    = XXH3_64bits_withSeed(encode(namespace), 0)        (64-bit seed)
 *   key_0 = XXH3_128bits_withSeed(le64(0) le64(0) || le32(t_0) ... le32(t_{n-1}), ns)
 *   key_i = XXH3_128bits_withSeed(le64(key_{i-1}.lo) le64(key_{i-1}.hi) || tokens_i, ns)
 *
 * where tokens_i are chunk i's token ids as little-endian u32, n tokens per
 * chunk (chunk_size for full chunks, 1..chunk_size-1 for a tail). The input
 * is exactly 16 + 4n bytes, so a chunk's key depends on its token count: a
 * tail of n tokens and a full chunk never hash the same message.
 *
 * Usage:
 *   struct kvrt_key_namespace ns = { .model_id = "Qwen/Qwen3-8B", .dtype = "bfloat16",
 *                                    .tp_size = 1, .pp_size = 1 };
 *   uint64_t seed = kvrt_key_namespace_hash(&ns);
 *   struct kvrt_chunk_key keys[KVRT_KEY_MAX_CHUNKS(n_tokens, 256)];
 *   size_t n = kvrt_key_prompt(seed, tokens, n_tokens, 256, false, keys, cap);
 */
#ifndef KVRT_ACTORS_KEY_H
#define KVRT_ACTORS_KEY_H

#include "actors/chunk.h"

/* Everything that changes the KV of a token sequence. Strings are UTF-8,
 * NUL-terminated; NULL equals "". Byte strings are (pointer, length). */
struct kvrt_key_bytes {
	const void *data; /* may be NULL when len == 0 */
	size_t len;       /* bytes */
};

struct kvrt_key_namespace {
	const char *model_id;  /* e.g. "meta-llama/Llama-3.1-8B-Instruct" */
	const char *dtype;     /* KV dtype as vLLM names it: "bfloat16", "fp8_e4m3" */
	uint32_t layout;       /* kernels' KV layout id (kernels/layout.h) */
	uint32_t tp_rank;      /* tensor-parallel rank of this worker */
	uint32_t tp_size;      /* tensor-parallel world size */
	uint32_t pp_rank;      /* pipeline stage */
	uint32_t pp_size;      /* pipeline stages */
	const char *lora_name; /* LoRA adapter name; NULL or "" = none */
	uint64_t lora_id;      /* LoRA adapter id (vLLM's lora_int_id); 0 = none */
	struct kvrt_key_bytes cache_salt; /* the request's cache_salt bytes */
	const struct kvrt_key_bytes *extra; /* extra keys (multimodal hashes...), in order */
	uint32_t num_extra;    /* entries in extra */
};

/* Version of the key spec, hashed into the namespace encoding. */
#define KVRT_KEY_SPEC_VERSION 1u

/* Most keys kvrt_key_prompt writes for n tokens in chunks of cs (tail included). */
#define KVRT_KEY_MAX_CHUNKS(n, cs) (((n) + (cs)-1) / (cs))

/* The 64-bit namespace hash (the seed of every key chain). Any thread. */
uint64_t kvrt_key_namespace_hash(const struct kvrt_key_namespace *ns);

/* The chain's start: key_{-1} = {0, 0}. */
static inline struct kvrt_chunk_key kvrt_key_root(void)
{
	return (struct kvrt_chunk_key){0, 0};
}

/* One chunk's key from its predecessor and its n (>= 1) token ids. Any thread. */
struct kvrt_chunk_key kvrt_key_chunk(uint64_t ns_hash, struct kvrt_chunk_key prev,
				     const uint32_t *tokens, uint32_t n);

/* Keys of a whole prompt: out[i] = key of chunk i, full chunks of
 * chunk_size tokens, then (with_tail and num_tokens % chunk_size != 0) the
 * tail chunk's key. Writes at most cap keys (stops early, no error) and
 * returns how many it wrote. No allocation; one pass over the tokens.
 * chunk_size must be >= 1 (0 writes nothing). Any thread. */
size_t kvrt_key_prompt(uint64_t ns_hash, const uint32_t *tokens, size_t num_tokens,
		       uint32_t chunk_size, bool with_tail, struct kvrt_chunk_key *out, size_t cap);

/* Hex form: 32 hex digits, hi then lo (XXH128's canonical order), NUL-terminated. */
void kvrt_key_format(struct kvrt_chunk_key k, char buf[33]);

#endif
