/* actors/key.c: see key.h; the spec is docs/keys.md. */
#define XXH_STATIC_LINKING_ONLY /* XXH3_state_t on the stack */
#include "runtime/bytes.h"
#include "actors/key.h"

#include <string.h>
#include <xxhash.h>

#if !defined(__BYTE_ORDER__) || !defined(__ORDER_LITTLE_ENDIAN__)
#error "key.c needs __BYTE_ORDER__"
#endif
#define KEY_LE (__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__)

/* Domain tag that opens every namespace encoding. */
static const char ns_tag[] = "kvrt-key-ns";

static void ns_u32(XXH3_state_t *st, uint32_t v)
{
	unsigned char b[4];
	kvrt_put_le32(b, v);
	XXH3_64bits_update(st, b, sizeof(b));
}

static void ns_u64(XXH3_state_t *st, uint64_t v)
{
	unsigned char b[8];
	kvrt_put_le64(b, v);
	XXH3_64bits_update(st, b, sizeof(b));
}

/* A byte string: le64(length) then the bytes. */
static void ns_bytes(XXH3_state_t *st, const void *p, size_t len)
{
	ns_u64(st, (uint64_t)len);
	if (len)
		XXH3_64bits_update(st, p, len);
}

static void ns_str(XXH3_state_t *st, const char *s)
{
	ns_bytes(st, s, s ? strlen(s) : 0);
}

uint64_t kvrt_key_namespace_hash(const struct kvrt_key_namespace *ns)
{
	XXH3_state_t st;
	XXH3_64bits_reset_withSeed(&st, 0);
	ns_bytes(&st, ns_tag, sizeof(ns_tag) - 1);
	ns_u32(&st, KVRT_KEY_SPEC_VERSION);
	ns_str(&st, ns->model_id);
	ns_str(&st, ns->dtype);
	ns_u32(&st, ns->layout);
	ns_u32(&st, ns->tp_rank);
	ns_u32(&st, ns->tp_size);
	ns_u32(&st, ns->pp_rank);
	ns_u32(&st, ns->pp_size);
	ns_str(&st, ns->lora_name);
	ns_u64(&st, ns->lora_id);
	ns_bytes(&st, ns->cache_salt.data, ns->cache_salt.len);
	ns_u32(&st, ns->num_extra);
	for (uint32_t i = 0; i < ns->num_extra; i++)
		ns_bytes(&st, ns->extra[i].data, ns->extra[i].len);
	return XXH3_64bits_digest(&st);
}

/* Tokens per swap buffer on big-endian hosts. */
#define SWAP_TOKENS 256u

/* Hash chunk tokens into a started state, as little-endian u32. */
static void update_tokens(XXH3_state_t *st, const uint32_t *tokens, uint32_t n)
{
	if (KEY_LE) {
		XXH3_128bits_update(st, tokens, (size_t)n * 4);
		return;
	}
	uint32_t buf[SWAP_TOKENS];
	while (n) {
		uint32_t m = n < SWAP_TOKENS ? n : SWAP_TOKENS;
		for (uint32_t i = 0; i < m; i++)
			buf[i] = __builtin_bswap32(tokens[i]);
		XXH3_128bits_update(st, buf, (size_t)m * 4);
		tokens += m;
		n -= m;
	}
}

/* One chunk with a caller-provided state (reset here: reuse costs nothing). */
static struct kvrt_chunk_key chunk_key(XXH3_state_t *st, uint64_t seed, struct kvrt_chunk_key prev,
				       const uint32_t *tokens, uint32_t n)
{
	unsigned char p[16];
	kvrt_put_le64(p, prev.lo);
	kvrt_put_le64(p + 8, prev.hi);
	XXH3_128bits_reset_withSeed(st, seed);
	XXH3_128bits_update(st, p, sizeof(p));
	update_tokens(st, tokens, n);
	XXH128_hash_t h = XXH3_128bits_digest(st);
	return (struct kvrt_chunk_key){.lo = h.low64, .hi = h.high64};
}

struct kvrt_chunk_key kvrt_key_chunk(uint64_t ns_hash, struct kvrt_chunk_key prev,
				     const uint32_t *tokens, uint32_t n)
{
	XXH3_state_t st;
	return chunk_key(&st, ns_hash, prev, tokens, n);
}

size_t kvrt_key_prompt(uint64_t ns_hash, const uint32_t *tokens, size_t num_tokens,
		       uint32_t chunk_size, bool with_tail, struct kvrt_chunk_key *out, size_t cap)
{
	if (!chunk_size)
		return 0;
	XXH3_state_t st;
	struct kvrt_chunk_key prev = kvrt_key_root();
	size_t full = num_tokens / chunk_size, n = 0;
	for (; n < full && n < cap; n++) {
		prev = chunk_key(&st, ns_hash, prev, tokens + n * chunk_size, chunk_size);
		out[n] = prev;
	}
	size_t rest = num_tokens - full * chunk_size;
	if (with_tail && rest && n == full && n < cap) {
		out[n] = chunk_key(&st, ns_hash, prev, tokens + n * chunk_size, (uint32_t)rest);
		n++;
	}
	return n;
}

void kvrt_key_format(struct kvrt_chunk_key k, char buf[33])
{
	static const char hex[] = "0123456789abcdef";
	for (int i = 0; i < 16; i++) {
		buf[i] = hex[(k.hi >> (60 - 4 * i)) & 15];
		buf[16 + i] = hex[(k.lo >> (60 - 4 * i)) & 15];
	}
	buf[32] = 0;
}
