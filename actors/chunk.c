/* actors/chunk.c: the chunk header codec and checksum; see chunk.h.
 *
 * Pure functions on caller memory, any thread. The encoding is explicit
 * little-endian byte stores, so it is the same on every host.
 */
#define XXH_STATIC_LINKING_ONLY /* XXH3_state_t's size, for a state on the stack */
#include "runtime/bytes.h"
#include "actors/chunk.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <xxhash.h>

_Static_assert(sizeof(KVRT_CHUNK_MAGIC) - 1 == 8, "magic is 8 bytes");

void kvrt_chunk_header_encode(const struct kvrt_chunk_header *h,
			      uint8_t out[KVRT_CHUNK_HEADER_SIZE])
{
	memcpy(out, KVRT_CHUNK_MAGIC, 8);
	kvrt_put_le32(out + 8, h->format_version);
	kvrt_put_le32(out + 12, h->header_size);
	kvrt_put_le64(out + 16, h->namespace_hash);
	kvrt_put_le64(out + 24, h->key.lo);
	kvrt_put_le64(out + 32, h->key.hi);
	kvrt_put_le32(out + 40, h->shape.num_layers);
	kvrt_put_le32(out + 44, h->shape.token_bytes);
	kvrt_put_le32(out + 48, h->shape.elem_size);
	kvrt_put_le32(out + 52, h->shape.layout);
	kvrt_put_le32(out + 56, h->num_tokens);
	kvrt_put_le32(out + 60, h->flags);
	kvrt_put_le64(out + 64, h->payload_len);
	kvrt_put_le64(out + KVRT_CHUNK_CHECKSUM_OFFSET, h->checksum);
}

int kvrt_chunk_header_decode(const uint8_t *in, size_t len, struct kvrt_chunk_header *h)
{
	if (!in || len < KVRT_CHUNK_HEADER_SIZE)
		return -EBADMSG;
	if (memcmp(in, KVRT_CHUNK_MAGIC, 8) != 0)
		return -EBADMSG;
	struct kvrt_chunk_header t = {
		.format_version = kvrt_get_le32(in + 8),
		.header_size = kvrt_get_le32(in + 12),
		.namespace_hash = kvrt_get_le64(in + 16),
		.key = {.lo = kvrt_get_le64(in + 24), .hi = kvrt_get_le64(in + 32)},
		.shape = {.num_layers = kvrt_get_le32(in + 40),
			  .token_bytes = kvrt_get_le32(in + 44),
			  .elem_size = kvrt_get_le32(in + 48),
			  .layout = kvrt_get_le32(in + 52)},
		.num_tokens = kvrt_get_le32(in + 56),
		.flags = kvrt_get_le32(in + 60),
		.payload_len = kvrt_get_le64(in + 64),
		.checksum = kvrt_get_le64(in + KVRT_CHUNK_CHECKSUM_OFFSET),
	};
	if (t.format_version != KVRT_CHUNK_FORMAT_VERSION || t.header_size != KVRT_CHUNK_HEADER_SIZE ||
	    t.flags != 0)
		return -EBADMSG;
	const struct kvrt_chunk_shape *s = &t.shape;
	if (s->num_layers == 0 || s->num_layers > KVRT_CHUNK_MAX_LAYERS)
		return -EBADMSG;
	if (s->elem_size != 1 && s->elem_size != 2 && s->elem_size != 4 && s->elem_size != 8)
		return -EBADMSG;
	if (s->token_bytes == 0 || s->token_bytes > KVRT_CHUNK_MAX_TOKEN_BYTES ||
	    s->token_bytes % s->elem_size != 0)
		return -EBADMSG;
	if (t.num_tokens == 0 || t.num_tokens > KVRT_CHUNK_MAX_TOKENS)
		return -EBADMSG;
	/* Cannot overflow: 2^12 * 2^20 * 2^24 = 2^56. */
	if (t.payload_len != kvrt_chunk_payload_bytes(s, t.num_tokens) ||
	    t.payload_len > KVRT_CHUNK_MAX_PAYLOAD)
		return -EBADMSG;
	*h = t;
	return 0;
}

/* The encoded header with its checksum field zeroed: the checksum's first
 * 80 input bytes. */
static void _hashable_header(const uint8_t in[KVRT_CHUNK_HEADER_SIZE],
			     uint8_t out[KVRT_CHUNK_HEADER_SIZE])
{
	memcpy(out, in, KVRT_CHUNK_HEADER_SIZE);
	memset(out + KVRT_CHUNK_CHECKSUM_OFFSET, 0, 8);
}

uint64_t kvrt_chunk_checksum(const uint8_t encoded_header[KVRT_CHUNK_HEADER_SIZE],
			     const void *payload, size_t len)
{
	XXH3_state_t st;
	uint8_t hb[KVRT_CHUNK_HEADER_SIZE];
	_hashable_header(encoded_header, hb);
	XXH3_64bits_reset(&st);
	XXH3_64bits_update(&st, hb, sizeof hb);
	if (len)
		XXH3_64bits_update(&st, payload, len);
	return XXH3_64bits_digest(&st);
}

void kvrt_chunk_header_set_checksum(uint8_t encoded_header[KVRT_CHUNK_HEADER_SIZE], uint64_t sum)
{
	kvrt_put_le64(encoded_header + KVRT_CHUNK_CHECKSUM_OFFSET, sum);
}

int kvrt_chunk_verify(const uint8_t encoded_header[KVRT_CHUNK_HEADER_SIZE], const void *payload,
		      size_t len, struct kvrt_chunk_header *h)
{
	struct kvrt_chunk_header t;
	int rc = kvrt_chunk_header_decode(encoded_header, KVRT_CHUNK_HEADER_SIZE, &t);
	if (rc)
		return rc;
	if (h)
		*h = t;
	if (t.payload_len != len)
		return -EBADMSG;
	if (kvrt_chunk_checksum(encoded_header, payload, len) != t.checksum)
		return -EBADMSG;
	return 0;
}

/* A streaming state: XXH3's own state (which needs 64-byte alignment). */
struct kvrt_chunk_sum {
	XXH3_state_t st; /* the running XXH3-64 */
};

struct kvrt_chunk_sum *kvrt_chunk_sum_create(void)
{
	return aligned_alloc(64, (sizeof(struct kvrt_chunk_sum) + 63) & ~(size_t)63);
}

void kvrt_chunk_sum_destroy(struct kvrt_chunk_sum *s)
{
	free(s);
}

void kvrt_chunk_sum_begin(struct kvrt_chunk_sum *s,
			  const uint8_t encoded_header[KVRT_CHUNK_HEADER_SIZE])
{
	uint8_t hb[KVRT_CHUNK_HEADER_SIZE];
	_hashable_header(encoded_header, hb);
	XXH3_64bits_reset(&s->st);
	XXH3_64bits_update(&s->st, hb, sizeof hb);
}

void kvrt_chunk_sum_update(struct kvrt_chunk_sum *s, const void *p, size_t n)
{
	if (n)
		XXH3_64bits_update(&s->st, p, n);
}

uint64_t kvrt_chunk_sum_digest(struct kvrt_chunk_sum *s)
{
	return XXH3_64bits_digest(&s->st);
}
