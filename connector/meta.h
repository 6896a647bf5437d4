/* connector/meta.h: the step metadata codec: the plan vLLM's scheduler
 * side hands its workers once per step (build_connector_meta), as plain bytes
 * (with TP/PP > 1 they are pickled to other processes).
 *
 * Owns nothing: pure functions over caller memory, any thread, no
 * allocation. The encoder writes into a caller buffer; the decoder validates
 * a whole message once and then hands out views into it (the caller keeps the
 * buffer alive while it reads them).
 *
 *   struct kvrt_meta_plan p = { .step = n, .block_size = 16, .chunk_size = 256,
 *                               .loads = loads, .num_loads = nl, ... };
 *   size_t len;
 *   if (kvrt_meta_encode(&p, buf, cap, &len) == -ENOSPC) { grow buf to len; retry; }
 *   ...                                   (bytes travel to the workers)
 *   struct kvrt_meta_view v;
 *   if (kvrt_meta_decode(bytes, n, &v)) { ... -EBADMSG: report loads failed ... }
 *   struct kvrt_meta_iter it; struct kvrt_meta_item r;
 *   for (kvrt_meta_iter_init(&it, &v, KVRT_META_LOADS); kvrt_meta_iter_next(&it, &r);)
 *           for (uint32_t t = r.token_start; t < r.token_end; t++)
 *                   slot = kvrt_meta_item_slot(&r, &v, t); ...
 *
 * What a plan says (vLLM terms: docs/vllm-connector.md, tests/python/VLLM-RECIPE.md):
 * - loads: for a request, copy tokens [token_start, token_end) from kvrt's
 *   chunks into vLLM's blocks. token_start is vLLM's num_computed_tokens (its
 *   own prefix hit), token_end = token_start + the tokens kvrt promised.
 *   Chunk c covers tokens [c*chunk_size, (c+1)*chunk_size); the load names
 *   the keys of chunks token_start/cs .. (token_end-1)/cs in order (the first
 *   one may be entered part way). The last chunk holds last_chunk_tokens
 *   tokens: chunk_size, or fewer for a tail chunk (save_unfull_chunk), flag
 *   UNFULL. Flag ASYNC: the request waits in WAITING_FOR_REMOTE_KVS and the
 *   load is reported through get_finished; else vLLM's step waits for it.
 * - saves: after this step's forward, copy tokens [token_start, token_end)
 *   from vLLM's blocks into chunks and store them. A save covers whole chunks:
 *   token_start = first chunk * chunk_size, token_end = last chunk's start +
 *   last_chunk_tokens. Flags UNFULL (the last chunk is a tail) and DECODE (KV
 *   computed while decoding: save_decode_cache).
 * - both: block_ids are the request's vLLM block ids for blocks
 *   token_start/bs .. (token_end-1)/bs (bs = block_size); token t sits at
 *   slot block_ids[t/bs - token_start/bs] * bs + t % bs. Block 0 is vLLM's
 *   null block and never a destination or source.
 * - preempted, finished: request ids whose blocks vLLM freed or is about to
 *   free (preemption) and ids of requests that finished this step.
 * Request ids: vLLM's string id bytes (1..KVRT_META_MAX_ID_LEN) and their
 * hash kvrt_meta_id_hash (XXH3-64, seed 0), checked on decode.
 *
 * Encoding, version 1. All integers little-endian, fixed width, no padding,
 * no alignment assumed (read through the accessors below).
 *
 *   header, 56 bytes:
 *     off size
 *      0   4  magic "KVRM"
 *      4   2  version = 1
 *      6   2  header size = 56
 *      8   4  total length of the message, header included (== buffer length)
 *     12   4  reserved, 0
 *     16   8  checksum: XXH3_64bits (seed 0) of bytes [24, total length)
  *     24   8  step (the scheduler's counter: the saves-done watermark, kvrt_engine_saves_done)
 *     32   4  block_size (vLLM tokens per block), 1..65536
 *     36   4  chunk_size (tokens per chunk), 1..65536
 *     40   4  number of loads       (each list at most KVRT_META_MAX_ITEMS)
 *     44   4  number of saves
 *     48   4  number of preempted ids
 *     52   4  number of finished ids
 *   then the loads, the saves, the preempted ids, the finished ids, in that
 *   order, and nothing after.
 *
 *   id:   u64 hash | u16 len | len bytes
 *   load, save:
 *         id | u32 flags | u32 token_start | u32 token_end |
 *         u32 last_chunk_tokens | u32 num_keys | u32 num_blocks |
 *         num_keys x (u64 lo | u64 hi) | num_blocks x u32 block id
 *
 * The decoder returns -EBADMSG, reading nothing outside [buf, buf+len), for:
 * a length below the header or different from the declared total, a total
 * above KVRT_META_MAX_BYTES, a bad magic, version, header size, reserved
 * field or checksum, sizes out of range, a list longer than
 * KVRT_META_MAX_ITEMS or than the bytes left could hold, an id length of 0
 * or above KVRT_META_MAX_ID_LEN, an id whose hash differs, flags not defined
 * for the list, an empty or reversed token range or one ending above
 * KVRT_META_MAX_TOKENS, a key count or block count other than the range
 * implies (a REFUSED load carries no keys and last_chunk_tokens =
 * chunk_size), last_chunk_tokens outside 1..chunk_size, UNFULL not matching
 * it, a range reaching past the last chunk's tokens, a save not covering whole
 * chunks, block id 0 or above INT32_MAX, bytes left over. It does not know
 * vLLM's num_gpu_blocks: the worker checks block ids against it.
 * The encoder applies the same rules to its input (-EINVAL), so whatever
 * it writes decodes.
 *
 * Threads: any; nothing shared.
 */
#ifndef KVRT_CONNECTOR_META_H
#define KVRT_CONNECTOR_META_H

#include "runtime/bytes.h"
#include "actors/chunk.h"
#include "runtime/common.h"

#define KVRT_META_MAGIC "KVRM"             /* 4 bytes, no terminator */
#define KVRT_META_VERSION 1u
#define KVRT_META_HEADER_SIZE 56u
#define KVRT_META_MAX_ID_LEN 1024u         /* longest request id, bytes */
#define KVRT_META_MAX_ITEMS 65536u         /* most entries in one list */
#define KVRT_META_MAX_TOKENS (1u << 30)    /* token ranges end at most here */
#define KVRT_META_MAX_SIZE 65536u          /* largest block_size, chunk_size */
#define KVRT_META_MAX_BYTES (1u << 30)     /* largest message */
#define KVRT_META_MAX_BLOCK 0x7fffffffu    /* largest block id */

/* Item flags. */
enum {
	KVRT_META_ASYNC = 1u << 0,  /* load: asynchronous (reported via get_finished) */
	KVRT_META_UNFULL = 1u << 1, /* load, save: the last chunk is a tail */
	KVRT_META_DECODE = 1u << 2, /* save: decode-phase KV */
	KVRT_META_REFUSED = 1u << 3, /* load: the scheduler refused it (vLLM's
				      * range did not match the lookup); the
				      * worker loads nothing and reports its
				      * blocks as load errors, so vLLM
				      * recomputes them. No keys; last chunk
				      * tokens = chunk_size */
};
#define KVRT_META_LOAD_FLAGS (KVRT_META_ASYNC | KVRT_META_UNFULL | KVRT_META_REFUSED)
#define KVRT_META_SAVE_FLAGS (KVRT_META_UNFULL | KVRT_META_DECODE)

/* A request id: vLLM's string id as bytes (not NUL-terminated). */
struct kvrt_meta_id {
	const char *id; /* bytes */
	uint32_t len;   /* 1..KVRT_META_MAX_ID_LEN */
};

/* A load or a save, as the encoder takes it. */
struct kvrt_meta_req {
	struct kvrt_meta_id id;            /* the request */
	uint32_t flags;                    /* KVRT_META_* for its list */
	uint32_t token_start;              /* first token */
	uint32_t token_end;                /* one past the last token */
	uint32_t last_chunk_tokens;        /* tokens in the last chunk: 1..chunk_size */
	const struct kvrt_chunk_key *keys; /* chunks token_start/cs .. (token_end-1)/cs */
	uint32_t num_keys;                 /* == (token_end-1)/cs - token_start/cs + 1 */
	const uint32_t *block_ids;         /* blocks token_start/bs .. (token_end-1)/bs */
	uint32_t num_blocks;               /* == (token_end-1)/bs - token_start/bs + 1 */
};

/* One step's plan, as the encoder takes it. */
struct kvrt_meta_plan {
	uint64_t step;                       /* scheduler step counter */
	uint32_t block_size;                 /* vLLM tokens per block */
	uint32_t chunk_size;                 /* kvrt tokens per chunk */
	const struct kvrt_meta_req *loads;   /* [num_loads] */
	uint32_t num_loads;
	const struct kvrt_meta_req *saves;   /* [num_saves] */
	uint32_t num_saves;
	const struct kvrt_meta_id *preempted; /* [num_preempted] */
	uint32_t num_preempted;
	const struct kvrt_meta_id *finished; /* [num_finished] */
	uint32_t num_finished;
};

/* Encode p into buf. 0 and *len = bytes written; -ENOSPC and *len = bytes
 * needed (cap 0 asks the size; buf's contents are then unspecified);
 * -EINVAL when p breaks a rule above (*len = 0). Any thread. */
int kvrt_meta_encode(const struct kvrt_meta_plan *p, void *buf, size_t cap, size_t *len);

/* The hash carried with every id: XXH3_64bits(id, len), seed 0. */
uint64_t kvrt_meta_id_hash(const void *id, size_t len);

/* The lists of a message. */
enum kvrt_meta_list {
	KVRT_META_LOADS = 0,
	KVRT_META_SAVES = 1,
	KVRT_META_PREEMPTED = 2,
	KVRT_META_FINISHED = 3,
};

/* A validated message: header fields, and where its lists are. Points into
 * the decoded buffer. */
struct kvrt_meta_view {
	uint64_t step;                /* scheduler step counter */
	uint32_t block_size;          /* vLLM tokens per block */
	uint32_t chunk_size;          /* kvrt tokens per chunk */
	uint32_t count[4];            /* entries per list (enum kvrt_meta_list) */
	const uint8_t *_list[5];      /* internal: start of each list, [4] = end */
};

/* One decoded entry: views into the buffer. For the id lists only id_hash,
 * id and id_len are set (the rest 0). */
struct kvrt_meta_item {
	uint64_t id_hash;           /* kvrt_meta_id_hash of the id */
	const char *id;             /* id bytes, not NUL-terminated */
	uint32_t id_len;            /* bytes of id */
	uint32_t flags;             /* KVRT_META_* */
	uint32_t token_start;       /* first token */
	uint32_t token_end;         /* one past the last */
	uint32_t last_chunk_tokens; /* tokens in the last chunk */
	uint32_t num_keys;          /* chunk keys (kvrt_meta_item_key) */
	uint32_t num_blocks;        /* block ids (kvrt_meta_item_block) */
	const uint8_t *_keys;       /* internal: num_keys x 16 bytes */
	const uint8_t *_blocks;     /* internal: num_blocks x 4 bytes */
};

/* Cursor over one list of a view. */
struct kvrt_meta_iter {
	const uint8_t *_p;   /* internal: next entry */
	const uint8_t *_end; /* internal: end of the list */
	uint32_t _left;      /* internal: entries left */
	bool _ids;           /* internal: an id list */
	const struct kvrt_meta_view *_v; /* internal: the view */
};

/* Validate the message buf[0..len) completely and describe it.
 * 0 or -EBADMSG (out untouched). Any thread. */
int kvrt_meta_decode(const void *buf, size_t len, struct kvrt_meta_view *out);

/* Iterate list l of v (a view kvrt_meta_decode filled). */
void kvrt_meta_iter_init(struct kvrt_meta_iter *it, const struct kvrt_meta_view *v,
			 enum kvrt_meta_list l);
/* The next entry into *out; false at the end. */
bool kvrt_meta_iter_next(struct kvrt_meta_iter *it, struct kvrt_meta_item *out);

/* Key i (< num_keys) of an entry: chunk token_start/chunk_size + i. */
static inline struct kvrt_chunk_key kvrt_meta_item_key(const struct kvrt_meta_item *r, uint32_t i)
{
	return (struct kvrt_chunk_key){kvrt_get_le64(r->_keys + 16 * (size_t)i),
				       kvrt_get_le64(r->_keys + 16 * (size_t)i + 8)};
}

/* Block id i (< num_blocks) of an entry: block token_start/block_size + i. */
static inline uint32_t kvrt_meta_item_block(const struct kvrt_meta_item *r, uint32_t i)
{
	return kvrt_get_le32(r->_blocks + 4 * (size_t)i);
}

/* vLLM slot of token t (token_start <= t < token_end). */
static inline uint64_t kvrt_meta_item_slot(const struct kvrt_meta_item *r,
					   const struct kvrt_meta_view *v, uint32_t t)
{
	uint32_t bs = v->block_size;
	return (uint64_t)kvrt_meta_item_block(r, t / bs - r->token_start / bs) * bs + t % bs;
}

/* Chunk index (token / chunk_size) of an entry's first key. */
static inline uint32_t kvrt_meta_item_first_chunk(const struct kvrt_meta_item *r,
						  const struct kvrt_meta_view *v)
{
	return r->token_start / v->chunk_size;
}

/* Tokens chunk i (< num_keys) of an entry holds: chunk_size, or
 * last_chunk_tokens for the last. */
static inline uint32_t kvrt_meta_item_chunk_tokens(const struct kvrt_meta_item *r,
						   const struct kvrt_meta_view *v, uint32_t i)
{
	return i + 1 == r->num_keys ? r->last_chunk_tokens : v->chunk_size;
}

#endif
