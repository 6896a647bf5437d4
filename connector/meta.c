/* connector/meta.c: see meta.h (the encoding is specified there). */
#include "connector/meta.h"

#include <errno.h>
#include <string.h>
#include <xxhash.h>

#define ID_FIXED 10u   /* u64 hash + u16 len */
#define ITEM_FIXED 24u /* six u32 after the id */
#define KEY_BYTES 16u
#define BLOCK_BYTES 4u

_Static_assert(KVRT_META_MAX_BYTES <= UINT32_MAX, "total length is a u32");

uint64_t kvrt_meta_id_hash(const void *id, size_t len)
{
	return XXH3_64bits(id, len);
}

/* --- the rules both sides apply ------------------------------------------- */

/* The rules of meta.h for one load or save, on its decoded numbers. */
static bool item_ok(bool save, uint32_t cs, uint32_t bs, uint32_t flags, uint32_t start,
		    uint32_t end, uint32_t last, uint32_t num_keys, uint32_t num_blocks)
{
	if (flags & ~(save ? KVRT_META_SAVE_FLAGS : KVRT_META_LOAD_FLAGS))
		return false;
	if (!(start < end) || end > KVRT_META_MAX_TOKENS)
		return false;
	uint32_t c0 = start / cs, c1 = (end - 1) / cs;
	if (flags & KVRT_META_REFUSED)
		return !(flags & KVRT_META_UNFULL) && num_keys == 0 && last == cs &&
		       num_blocks == (end - 1) / bs - start / bs + 1;
	if (num_keys != c1 - c0 + 1)
		return false;
	if (last < 1 || last > cs || ((flags & KVRT_META_UNFULL) != 0) != (last < cs))
		return false;
	uint64_t content_end = (uint64_t)c1 * cs + last; /* one past the last chunk's tokens */
	if (end > content_end)
		return false;
	if (save && (start != (uint64_t)c0 * cs || end != content_end))
		return false;
	if (num_blocks != (end - 1) / bs - start / bs + 1)
		return false;
	return true;
}

static bool block_ok(uint32_t b)
{
	return b != 0 && b <= KVRT_META_MAX_BLOCK;
}

static bool id_ok(const struct kvrt_meta_id *id)
{
	return id->len >= 1 && id->len <= KVRT_META_MAX_ID_LEN && id->id;
}

/* --- encoder -------------------------------------------------------------- */

/* Size of a load/save entry, or 0 when it breaks a rule. */
static uint64_t req_size(const struct kvrt_meta_plan *p, const struct kvrt_meta_req *r, bool save)
{
	if (!id_ok(&r->id))
		return 0;
	if (!item_ok(save, p->chunk_size, p->block_size, r->flags, r->token_start, r->token_end,
		     r->last_chunk_tokens, r->num_keys, r->num_blocks))
		return 0;
	if ((!r->keys && r->num_keys) || !r->block_ids)
		return 0;
	for (uint32_t i = 0; i < r->num_blocks; i++)
		if (!block_ok(r->block_ids[i]))
			return 0;
	return ID_FIXED + r->id.len + ITEM_FIXED + (uint64_t)r->num_keys * KEY_BYTES +
	       (uint64_t)r->num_blocks * BLOCK_BYTES;
}

/* The encoded size of p, or 0 when p breaks a rule. */
static uint64_t plan_size(const struct kvrt_meta_plan *p)
{
	if (p->block_size < 1 || p->block_size > KVRT_META_MAX_SIZE || p->chunk_size < 1 ||
	    p->chunk_size > KVRT_META_MAX_SIZE)
		return 0;
	if (p->num_loads > KVRT_META_MAX_ITEMS || p->num_saves > KVRT_META_MAX_ITEMS ||
	    p->num_preempted > KVRT_META_MAX_ITEMS || p->num_finished > KVRT_META_MAX_ITEMS)
		return 0;
	if ((p->num_loads && !p->loads) || (p->num_saves && !p->saves) ||
	    (p->num_preempted && !p->preempted) || (p->num_finished && !p->finished))
		return 0;
	uint64_t n = KVRT_META_HEADER_SIZE;
	for (uint32_t i = 0; i < p->num_loads; i++) {
		uint64_t s = req_size(p, &p->loads[i], false);
		if (!s)
			return 0;
		n += s;
	}
	for (uint32_t i = 0; i < p->num_saves; i++) {
		uint64_t s = req_size(p, &p->saves[i], true);
		if (!s)
			return 0;
		n += s;
	}
	for (uint32_t i = 0; i < p->num_preempted; i++) {
		if (!id_ok(&p->preempted[i]))
			return 0;
		n += ID_FIXED + p->preempted[i].len;
	}
	for (uint32_t i = 0; i < p->num_finished; i++) {
		if (!id_ok(&p->finished[i]))
			return 0;
		n += ID_FIXED + p->finished[i].len;
	}
	return n;
}

static uint8_t *put_id(uint8_t *o, const struct kvrt_meta_id *id)
{
	kvrt_put_le64(o, kvrt_meta_id_hash(id->id, id->len));
	kvrt_put_le16(o + 8, (uint16_t)id->len);
	memcpy(o + ID_FIXED, id->id, id->len);
	return o + ID_FIXED + id->len;
}

static uint8_t *put_req(uint8_t *o, const struct kvrt_meta_req *r)
{
	o = put_id(o, &r->id);
	kvrt_put_le32(o, r->flags);
	kvrt_put_le32(o + 4, r->token_start);
	kvrt_put_le32(o + 8, r->token_end);
	kvrt_put_le32(o + 12, r->last_chunk_tokens);
	kvrt_put_le32(o + 16, r->num_keys);
	kvrt_put_le32(o + 20, r->num_blocks);
	o += ITEM_FIXED;
	for (uint32_t i = 0; i < r->num_keys; i++, o += KEY_BYTES) {
		kvrt_put_le64(o, r->keys[i].lo);
		kvrt_put_le64(o + 8, r->keys[i].hi);
	}
	for (uint32_t i = 0; i < r->num_blocks; i++, o += BLOCK_BYTES)
		kvrt_put_le32(o, r->block_ids[i]);
	return o;
}

int kvrt_meta_encode(const struct kvrt_meta_plan *p, void *buf, size_t cap, size_t *len)
{
	uint64_t need = plan_size(p);
	if (!need || need > KVRT_META_MAX_BYTES) {
		*len = 0;
		return -EINVAL;
	}
	*len = (size_t)need;
	if (need > cap || !buf)
		return -ENOSPC;
	uint8_t *b = buf, *o = b + KVRT_META_HEADER_SIZE;
	memcpy(b, KVRT_META_MAGIC, 4);
	kvrt_put_le16(b + 4, KVRT_META_VERSION);
	kvrt_put_le16(b + 6, KVRT_META_HEADER_SIZE);
	kvrt_put_le32(b + 8, (uint32_t)need);
	kvrt_put_le32(b + 12, 0);
	kvrt_put_le64(b + 24, p->step);
	kvrt_put_le32(b + 32, p->block_size);
	kvrt_put_le32(b + 36, p->chunk_size);
	kvrt_put_le32(b + 40, p->num_loads);
	kvrt_put_le32(b + 44, p->num_saves);
	kvrt_put_le32(b + 48, p->num_preempted);
	kvrt_put_le32(b + 52, p->num_finished);
	for (uint32_t i = 0; i < p->num_loads; i++)
		o = put_req(o, &p->loads[i]);
	for (uint32_t i = 0; i < p->num_saves; i++)
		o = put_req(o, &p->saves[i]);
	for (uint32_t i = 0; i < p->num_preempted; i++)
		o = put_id(o, &p->preempted[i]);
	for (uint32_t i = 0; i < p->num_finished; i++)
		o = put_id(o, &p->finished[i]);
	KVRT_ASSERT((uint64_t)(o - b) == need);
	kvrt_put_le64(b + 16, XXH3_64bits(b + 24, (size_t)need - 24));
	return 0;
}

/* --- decoder -------------------------------------------------------------- */

/* Parse one entry at p (bounded by end). kind: 0 load, 1 save, 2 id. With
 * check, every rule is applied (hashes included); without, only what keeps
 * the reads in bounds (the view was validated). Returns the byte after the
 * entry, or NULL. */
static const uint8_t *parse_entry(const uint8_t *p, const uint8_t *end, int kind,
				  const struct kvrt_meta_view *v, bool check,
				  struct kvrt_meta_item *out)
{
	size_t left = (size_t)(end - p);
	if (left < ID_FIXED)
		return NULL;
	uint64_t hash = kvrt_get_le64(p);
	uint32_t idlen = kvrt_get_le16(p + 8);
	if (idlen < 1 || idlen > KVRT_META_MAX_ID_LEN || left - ID_FIXED < idlen)
		return NULL;
	const uint8_t *id = p + ID_FIXED;
	if (check && kvrt_meta_id_hash(id, idlen) != hash)
		return NULL;
	p = id + idlen;
	memset(out, 0, sizeof(*out));
	out->id_hash = hash;
	out->id = (const char *)id;
	out->id_len = idlen;
	if (kind == 2)
		return p;
	left = (size_t)(end - p);
	if (left < ITEM_FIXED)
		return NULL;
	uint32_t flags = kvrt_get_le32(p), start = kvrt_get_le32(p + 4);
	uint32_t iend = kvrt_get_le32(p + 8), last = kvrt_get_le32(p + 12);
	uint32_t nk = kvrt_get_le32(p + 16), nb = kvrt_get_le32(p + 20);
	p += ITEM_FIXED;
	left -= ITEM_FIXED;
	/* Counts first against the bytes left (64-bit products: no overflow). */
	uint64_t body = (uint64_t)nk * KEY_BYTES + (uint64_t)nb * BLOCK_BYTES;
	if (body > left)
		return NULL;
	if (check && !item_ok(kind == 1, v->chunk_size, v->block_size, flags, start, iend, last,
			      nk, nb))
		return NULL;
	out->flags = flags;
	out->token_start = start;
	out->token_end = iend;
	out->last_chunk_tokens = last;
	out->num_keys = nk;
	out->num_blocks = nb;
	out->_keys = p;
	out->_blocks = p + (size_t)nk * KEY_BYTES;
	if (check)
		for (uint32_t i = 0; i < nb; i++)
			if (!block_ok(kvrt_meta_item_block(out, i)))
				return NULL;
	return p + body;
}

int kvrt_meta_decode(const void *buf, size_t len, struct kvrt_meta_view *out)
{
	const uint8_t *b = buf;
	if (!b || len < KVRT_META_HEADER_SIZE || len > KVRT_META_MAX_BYTES)
		return -EBADMSG;
	if (memcmp(b, KVRT_META_MAGIC, 4) || kvrt_get_le16(b + 4) != KVRT_META_VERSION ||
	    kvrt_get_le16(b + 6) != KVRT_META_HEADER_SIZE || kvrt_get_le32(b + 8) != len ||
	    kvrt_get_le32(b + 12) != 0)
		return -EBADMSG;
#ifndef FUZZING_BUILD_MODE_UNSAFE_FOR_PRODUCTION /* fuzz builds reach the lists behind it */
	if (kvrt_get_le64(b + 16) != XXH3_64bits(b + 24, len - 24))
		return -EBADMSG;
#endif
	struct kvrt_meta_view v = {
		.step = kvrt_get_le64(b + 24),
		.block_size = kvrt_get_le32(b + 32),
		.chunk_size = kvrt_get_le32(b + 36),
	};
	if (v.block_size < 1 || v.block_size > KVRT_META_MAX_SIZE || v.chunk_size < 1 ||
	    v.chunk_size > KVRT_META_MAX_SIZE)
		return -EBADMSG;
	const uint8_t *p = b + KVRT_META_HEADER_SIZE, *end = b + len;
	/* Cheap bound before any walk: every entry takes its fixed bytes. */
	uint64_t least = 0;
	for (int l = 0; l < 4; l++) {
		v.count[l] = kvrt_get_le32(b + 40 + 4 * l);
		if (v.count[l] > KVRT_META_MAX_ITEMS)
			return -EBADMSG;
		least += (uint64_t)v.count[l] * (ID_FIXED + 1 + (l < 2 ? ITEM_FIXED : 0));
	}
	if (least > (uint64_t)(end - p))
		return -EBADMSG;
	for (int l = 0; l < 4; l++) {
		v._list[l] = p;
		for (uint32_t i = 0; i < v.count[l]; i++) {
			struct kvrt_meta_item it;
			p = parse_entry(p, end, l < 2 ? l : 2, &v, true, &it);
			if (!p)
				return -EBADMSG;
		}
	}
	if (p != end)
		return -EBADMSG;
	v._list[4] = end;
	*out = v;
	return 0;
}

void kvrt_meta_iter_init(struct kvrt_meta_iter *it, const struct kvrt_meta_view *v,
			 enum kvrt_meta_list l)
{
	KVRT_ASSERT((unsigned)l < 4);
	it->_p = v->_list[l];
	it->_end = v->_list[l + 1];
	it->_left = v->count[l];
	it->_ids = l >= KVRT_META_PREEMPTED;
	it->_v = v;
}

bool kvrt_meta_iter_next(struct kvrt_meta_iter *it, struct kvrt_meta_item *out)
{
	if (!it->_left)
		return false;
	/* The view was validated: this parse cannot fail; bounds stay checked. */
	const uint8_t *n = parse_entry(it->_p, it->_end, it->_ids ? 2 : 0, it->_v, false, out);
	if (!n) {
		it->_left = 0;
		return false;
	}
	it->_p = n;
	it->_left--;
	return true;
}
