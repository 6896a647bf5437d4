/* actors/chunk.h: the types every tier shares: chunk keys, tiers, the shape
 * of a chunk's payload, and the self-describing header that precedes a chunk
 * wherever it leaves process memory (disk files, Redis values).
 *
 * Payload layout (kvrt's chunk layout, see kernels/): layer-major. A chunk of
 * n tokens holds num_layers ranges of n * token_bytes bytes each, layer 0
 * first, so a per-layer load reads one contiguous range:
 *     layer l starts at  l * n * token_bytes
 * Inside a layer range the order is the kernels' (K of all n tokens, then V
 * of all n tokens; MLA: the n latent vectors).
 *
 * Header encoding: little-endian, fixed 80 bytes, see struct kvrt_chunk_header.
 * Functions: actors/chunk.c. Pure functions, any thread.
 */
#ifndef KVRT_ACTORS_CHUNK_H
#define KVRT_ACTORS_CHUNK_H

#include "runtime/common.h"

/* A chunk's identity: 128-bit chained XXH3 (actors/key.h has the spec). */
struct kvrt_chunk_key {
	uint64_t lo; /* low 64 bits of XXH128 */
	uint64_t hi; /* high 64 bits of XXH128 */
};

static inline bool kvrt_chunk_key_eq(struct kvrt_chunk_key a, struct kvrt_chunk_key b)
{
	return a.lo == b.lo && a.hi == b.hi;
}

/* Where a chunk's bytes are. Ordered from fastest to slowest. */
enum kvrt_tier {
	KVRT_TIER_NONE = 0,   /* not cached */
	KVRT_TIER_CPU = 1,    /* a slab of the CPU pool */
	KVRT_TIER_DISK = 2,   /* a file of the local disk tier */
	KVRT_TIER_REMOTE = 3, /* a Redis value */
};

/* Shape of one chunk's payload. */
struct kvrt_chunk_shape {
	uint32_t num_layers;  /* layers stored (layers sharing storage once) */
	uint32_t token_bytes; /* bytes of one token of one layer (K+V, or MLA's latent) */
	uint32_t elem_size;   /* bytes per element: 1 fp8, 2 fp16/bf16, 4 fp32 */
	uint32_t layout;      /* the source KV layout id (kernels/layout.h), informational;
			       * | KVRT_CHUNK_LAYOUT_WHOLE_BLOCKS for chunks of whole
			       * blocks of an opaque interior (another namespace too) */
};

#define KVRT_CHUNK_LAYOUT_WHOLE_BLOCKS 0x100u

/* Payload bytes of a chunk of n tokens. */
static inline uint64_t kvrt_chunk_payload_bytes(const struct kvrt_chunk_shape *s, uint32_t n)
{
	return (uint64_t)s->num_layers * n * s->token_bytes;
}

#define KVRT_CHUNK_MAGIC "KVRTCHK1"    /* 8 bytes, no terminator stored */
#define KVRT_CHUNK_FORMAT_VERSION 1u
#define KVRT_CHUNK_HEADER_SIZE 80u

/* The header in host form; encoded little-endian in this field order. */
struct kvrt_chunk_header {
	uint32_t format_version;     /* KVRT_CHUNK_FORMAT_VERSION */
	uint32_t header_size;        /* KVRT_CHUNK_HEADER_SIZE */
	uint64_t namespace_hash;     /* seed of the key chain (actors/key.h) */
	struct kvrt_chunk_key key;   /* the chunk's key */
	struct kvrt_chunk_shape shape;
	uint32_t num_tokens;         /* tokens in this chunk (< chunk_size: a tail) */
	uint32_t flags;              /* reserved, 0 */
	uint64_t payload_len;        /* == kvrt_chunk_payload_bytes(shape, num_tokens) */
	uint64_t checksum;           /* XXH3-64 of the encoded header (checksum
				      * field zero) followed by the payload */
};

/* --- Header codec and checksum (actors/chunk.c) -----------------------------
 *
 * Encoded header, 80 bytes, little-endian:
 *     0  magic "KVRTCHK1"        8
 *     8  format_version          4    40 shape.num_layers   4
 *    12  header_size             4    44 shape.token_bytes  4
 *    16  namespace_hash          8    48 shape.elem_size    4
 *    24  key.lo                  8    52 shape.layout       4
 *    32  key.hi                  8    56 num_tokens         4
 *                                     60 flags              4
 *                                     64 payload_len        8
 *                                     72 checksum           8
 * Checksum: XXH3-64 (seed 0) over the 80 encoded bytes with bytes 72..79 set
 * to zero, followed by the payload; one streaming state, so it equals XXH3-64
 * of that concatenation. Pure functions; any thread.
 */

/* Bounds a decoded header must respect (anything larger is corruption). */
#define KVRT_CHUNK_MAX_LAYERS 4096u          /* shape.num_layers */
#define KVRT_CHUNK_MAX_TOKEN_BYTES (1u << 24) /* shape.token_bytes */
#define KVRT_CHUNK_MAX_TOKENS (1u << 20)     /* num_tokens */
#define KVRT_CHUNK_MAX_PAYLOAD (1ull << 34)  /* payload_len: 16 GiB */
#define KVRT_CHUNK_CHECKSUM_OFFSET 72u       /* of the checksum in the encoding */

/* Write *h (magic, then every field; h->format_version and h->header_size
 * are written as given) into out. */
void kvrt_chunk_header_encode(const struct kvrt_chunk_header *h,
			      uint8_t out[KVRT_CHUNK_HEADER_SIZE]);

/* Decode and validate len bytes at in. 0, or -EBADMSG: len < 80, bad magic,
 * unknown format_version, header_size != 80, nonzero flags, a zero or absurd
 * shape field (above the KVRT_CHUNK_MAX_* bounds, elem_size not 1/2/4/8,
 * token_bytes not a multiple of elem_size), num_tokens 0 or too large, or
 * payload_len != kvrt_chunk_payload_bytes(shape, num_tokens). *h is written
 * only on success. */
int kvrt_chunk_header_decode(const uint8_t *in, size_t len, struct kvrt_chunk_header *h);

/* The checksum of a chunk: encoded_header's checksum field is ignored (read
 * as zero). */
uint64_t kvrt_chunk_checksum(const uint8_t encoded_header[KVRT_CHUNK_HEADER_SIZE],
			     const void *payload, size_t len);

/* Store sum into the encoded header's checksum field. */
void kvrt_chunk_header_set_checksum(uint8_t encoded_header[KVRT_CHUNK_HEADER_SIZE],
				    uint64_t sum);

/* Decode encoded_header (written to *h when h != NULL, even on a checksum
 * mismatch, so callers can name the key) and check that payload holds exactly
 * payload_len bytes whose checksum matches. 0 or -EBADMSG. */
int kvrt_chunk_verify(const uint8_t encoded_header[KVRT_CHUNK_HEADER_SIZE], const void *payload,
		      size_t len, struct kvrt_chunk_header *h);

/* Streaming checksum for payloads that arrive in pieces (a disk read, a
 * Redis reply): begin with the encoded header, update with each piece in
 * order, digest. Equal to kvrt_chunk_checksum over the concatenation. One
 * state per thread at a time; create may fail (NULL) on ENOMEM. */
struct kvrt_chunk_sum;
struct kvrt_chunk_sum *kvrt_chunk_sum_create(void);
void kvrt_chunk_sum_destroy(struct kvrt_chunk_sum *s);
void kvrt_chunk_sum_begin(struct kvrt_chunk_sum *s,
			  const uint8_t encoded_header[KVRT_CHUNK_HEADER_SIZE]);
void kvrt_chunk_sum_update(struct kvrt_chunk_sum *s, const void *p, size_t n);
uint64_t kvrt_chunk_sum_digest(struct kvrt_chunk_sum *s);

#endif
