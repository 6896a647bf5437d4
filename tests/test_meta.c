/* tests/test_meta.c: the step metadata codec (connector/meta.h): round trips
 * of random plans, every truncation, bit flips, oversized counts, and a small
 * mutation fuzz loop (run under ASan by `ninja test`: the decoder gets buffers
 * of exactly the message's size, so any read past them is reported). */
#include <criterion/criterion.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <xxhash.h>

#include "connector/meta.h"
#include "tests/test_util.h"

/* --- random plans ----------------------------------------------------------- */

#define MAX_REQ 8   /* loads/saves per plan in these tests */
#define MAX_IDS 8   /* preempted/finished ids */
#define MAX_KEYS 12 /* keys per entry */

struct gen_req {
	char id[KVRT_META_MAX_ID_LEN];
	struct kvrt_chunk_key keys[MAX_KEYS];
	uint32_t *blocks; /* malloc'd */
};

/* A plan and the memory behind it. */
struct gen {
	struct kvrt_meta_plan plan;
	struct kvrt_meta_req loads[MAX_REQ], saves[MAX_REQ];
	struct kvrt_meta_id preempted[MAX_IDS], finished[MAX_IDS];
	struct gen_req lmem[MAX_REQ], smem[MAX_REQ];
	char pid[MAX_IDS][64], fid[MAX_IDS][64];
};

static uint32_t rnd(uint64_t *s, uint32_t lo, uint32_t hi) /* [lo, hi] */
{
	return lo + (uint32_t)(kvrt_test_rand(s) % ((uint64_t)hi - lo + 1));
}

static uint32_t gen_id(uint64_t *s, char *buf, uint32_t cap)
{
	uint32_t len = rnd(s, 0, 9) == 0 ? rnd(s, 1, cap) : rnd(s, 1, cap < 48 ? cap : 48);
	for (uint32_t i = 0; i < len; i++)
		buf[i] = (char)rnd(s, 0, 255); /* any bytes, NUL included */
	return len;
}

static void gen_req(uint64_t *s, const struct kvrt_meta_plan *p, bool save,
		    struct kvrt_meta_req *r, struct gen_req *m)
{
	uint32_t cs = p->chunk_size, bs = p->block_size;
	memset(r, 0, sizeof(*r));
	r->id.id = m->id;
	r->id.len = gen_id(s, m->id, KVRT_META_MAX_ID_LEN);
	uint32_t nk = rnd(s, 1, MAX_KEYS);
	uint32_t c0 = rnd(s, 0, 40);
	uint32_t c1 = c0 + nk - 1;
	bool unfull = cs > 1 && rnd(s, 0, 3) == 0;
	uint32_t last = unfull ? rnd(s, 1, cs - 1) : cs;
	uint32_t content_end = c1 * cs + last;
	uint32_t start, end;
	if (save) {
		start = c0 * cs;
		end = content_end;
	} else if (nk == 1) {
		start = rnd(s, c0 * cs, content_end - 1);
		end = rnd(s, start + 1, content_end);
	} else {
		start = rnd(s, c0 * cs, (c0 + 1) * cs - 1);
		end = rnd(s, c1 * cs + 1, content_end);
	}
	r->flags = (unfull ? KVRT_META_UNFULL : 0);
	if (!save && rnd(s, 0, 1))
		r->flags |= KVRT_META_ASYNC;
	if (save && rnd(s, 0, 1))
		r->flags |= KVRT_META_DECODE;
	r->token_start = start;
	r->token_end = end;
	r->last_chunk_tokens = last;
	r->num_keys = nk;
	for (uint32_t i = 0; i < nk; i++)
		m->keys[i] = (struct kvrt_chunk_key){kvrt_test_rand(s), kvrt_test_rand(s)};
	r->keys = m->keys;
	r->num_blocks = (end - 1) / bs - start / bs + 1;
	m->blocks = malloc(sizeof(uint32_t) * r->num_blocks);
	cr_assert_not_null(m->blocks);
	for (uint32_t i = 0; i < r->num_blocks; i++)
		m->blocks[i] = rnd(s, 0, 3) ? rnd(s, 1, 100000) : rnd(s, 1, KVRT_META_MAX_BLOCK);
	r->block_ids = m->blocks;
}

static void gen_plan(uint64_t *s, struct gen *g)
{
	static const uint32_t sizes[] = {1, 2, 3, 16, 16, 32, 64, 128, 256, 256, 1024};
	memset(g, 0, sizeof(*g));
	struct kvrt_meta_plan *p = &g->plan;
	p->step = kvrt_test_rand(s);
	p->block_size = sizes[rnd(s, 0, KVRT_ARRAY_LEN(sizes) - 1)];
	p->chunk_size = rnd(s, 0, 1) ? 256 : sizes[rnd(s, 0, KVRT_ARRAY_LEN(sizes) - 1)];
	p->num_loads = rnd(s, 0, MAX_REQ);
	p->num_saves = rnd(s, 0, MAX_REQ);
	p->num_preempted = rnd(s, 0, MAX_IDS);
	p->num_finished = rnd(s, 0, MAX_IDS);
	for (uint32_t i = 0; i < p->num_loads; i++)
		gen_req(s, p, false, &g->loads[i], &g->lmem[i]);
	for (uint32_t i = 0; i < p->num_saves; i++)
		gen_req(s, p, true, &g->saves[i], &g->smem[i]);
	for (uint32_t i = 0; i < p->num_preempted; i++)
		g->preempted[i] = (struct kvrt_meta_id){g->pid[i], gen_id(s, g->pid[i], 64)};
	for (uint32_t i = 0; i < p->num_finished; i++)
		g->finished[i] = (struct kvrt_meta_id){g->fid[i], gen_id(s, g->fid[i], 64)};
	p->loads = g->loads;
	p->saves = g->saves;
	p->preempted = g->preempted;
	p->finished = g->finished;
}

static void gen_free(struct gen *g)
{
	for (int i = 0; i < MAX_REQ; i++) {
		free(g->lmem[i].blocks);
		free(g->smem[i].blocks);
	}
}

/* Encode into a fresh malloc'd buffer of exactly the message's size. */
static uint8_t *encode_new(const struct kvrt_meta_plan *p, size_t *len)
{
	size_t need = 0;
	cr_assert_eq(kvrt_meta_encode(p, NULL, 0, &need), -ENOSPC);
	cr_assert_geq(need, KVRT_META_HEADER_SIZE);
	uint8_t *buf = malloc(need);
	cr_assert_not_null(buf);
	memset(buf, 0xa5, need);
	size_t got = 0;
	cr_assert_eq(kvrt_meta_encode(p, buf, need, &got), 0);
	cr_assert_eq(got, need);
	*len = need;
	return buf;
}

/* Recompute the header's total length and checksum (layout of meta.h), so a
 * mutated message reaches the structural checks behind them. */
static void reseal(uint8_t *b, size_t len)
{
	if (len < KVRT_META_HEADER_SIZE)
		return;
	for (int i = 0; i < 4; i++)
		b[8 + i] = (uint8_t)(len >> (8 * i));
	uint64_t h = XXH3_64bits(b + 24, len - 24);
	for (int i = 0; i < 8; i++)
		b[16 + i] = (uint8_t)(h >> (8 * i));
}

static void put32(uint8_t *p, uint32_t v)
{
	for (int i = 0; i < 4; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}

/* Decode a copy held in a buffer of exactly len bytes (ASan sees overreads). */
static int decode_exact(const uint8_t *src, size_t len, struct kvrt_meta_view *v)
{
	uint8_t *b = malloc(len ? len : 1);
	cr_assert_not_null(b);
	memcpy(b, src, len);
	int rc = kvrt_meta_decode(b, len, v);
	free(b);
	return rc;
}

/* --- checks ------------------------------------------------------------------ */

static bool same_id(const struct kvrt_meta_item *it, const struct kvrt_meta_id *id)
{
	return it->id_len == id->len && !memcmp(it->id, id->id, id->len) &&
	       it->id_hash == kvrt_meta_id_hash(id->id, id->len);
}

static void expect_same_req(const struct kvrt_meta_item *it, const struct kvrt_meta_req *r,
			    const struct kvrt_meta_view *v)
{
	cr_assert(same_id(it, &r->id));
	cr_assert_eq(it->flags, r->flags);
	cr_assert_eq(it->token_start, r->token_start);
	cr_assert_eq(it->token_end, r->token_end);
	cr_assert_eq(it->last_chunk_tokens, r->last_chunk_tokens);
	cr_assert_eq(it->num_keys, r->num_keys);
	cr_assert_eq(it->num_blocks, r->num_blocks);
	for (uint32_t i = 0; i < r->num_keys; i++)
		cr_assert(kvrt_chunk_key_eq(kvrt_meta_item_key(it, i), r->keys[i]));
	for (uint32_t i = 0; i < r->num_blocks; i++)
		cr_assert_eq(kvrt_meta_item_block(it, i), r->block_ids[i]);
	/* Slots: token t sits in block t/bs of the request's table. */
	uint32_t bs = v->block_size;
	for (uint32_t t = r->token_start; t < r->token_end; t += 1 + t % 7) {
		uint64_t want = (uint64_t)r->block_ids[t / bs - r->token_start / bs] * bs + t % bs;
		cr_assert_eq(kvrt_meta_item_slot(it, v, t), want);
	}
	if (r->flags & KVRT_META_REFUSED)
		return; /* no keys: nothing of chunks to check */
	cr_assert_eq(kvrt_meta_item_first_chunk(it, v) + it->num_keys - 1,
		     (r->token_end - 1) / v->chunk_size);
	uint32_t tokens = 0;
	for (uint32_t i = 0; i < it->num_keys; i++)
		tokens += kvrt_meta_item_chunk_tokens(it, v, i);
	cr_assert_eq(tokens, (it->num_keys - 1) * v->chunk_size + it->last_chunk_tokens);
}

static void expect_round_trip(const struct kvrt_meta_plan *p, const uint8_t *buf, size_t len)
{
	struct kvrt_meta_view v;
	memset(&v, 0xa5, sizeof(v));
	cr_assert_eq(decode_exact(buf, len, &v), 0);
	cr_assert_eq(v.step, p->step);
	cr_assert_eq(v.block_size, p->block_size);
	cr_assert_eq(v.chunk_size, p->chunk_size);
	cr_assert_eq(v.count[KVRT_META_LOADS], p->num_loads);
	cr_assert_eq(v.count[KVRT_META_SAVES], p->num_saves);
	cr_assert_eq(v.count[KVRT_META_PREEMPTED], p->num_preempted);
	cr_assert_eq(v.count[KVRT_META_FINISHED], p->num_finished);
	/* Iterate the caller's buffer itself (views point into it). */
	cr_assert_eq(kvrt_meta_decode(buf, len, &v), 0);
	struct kvrt_meta_iter it;
	struct kvrt_meta_item r;
	uint32_t n = 0;
	for (kvrt_meta_iter_init(&it, &v, KVRT_META_LOADS); kvrt_meta_iter_next(&it, &r); n++)
		expect_same_req(&r, &p->loads[n], &v);
	cr_assert_eq(n, p->num_loads);
	n = 0;
	for (kvrt_meta_iter_init(&it, &v, KVRT_META_SAVES); kvrt_meta_iter_next(&it, &r); n++)
		expect_same_req(&r, &p->saves[n], &v);
	cr_assert_eq(n, p->num_saves);
	n = 0;
	for (kvrt_meta_iter_init(&it, &v, KVRT_META_PREEMPTED); kvrt_meta_iter_next(&it, &r); n++)
		cr_assert(same_id(&r, &p->preempted[n]) && r.num_keys == 0 && r.num_blocks == 0);
	cr_assert_eq(n, p->num_preempted);
	n = 0;
	for (kvrt_meta_iter_init(&it, &v, KVRT_META_FINISHED); kvrt_meta_iter_next(&it, &r); n++)
		cr_assert(same_id(&r, &p->finished[n]));
	cr_assert_eq(n, p->num_finished);
}

/* An accepted message must be a plan that keeps every rule: re-encoding what
 * was decoded gives the same bytes (the encoder checks every rule, and the
 * encoding is canonical). */
static void expect_self_consistent(const uint8_t *buf, size_t len, const struct kvrt_meta_view *v)
{
	struct kvrt_meta_plan p = {.step = v->step, .block_size = v->block_size,
				   .chunk_size = v->chunk_size};
	struct kvrt_meta_req *reqs[2] = {NULL, NULL};
	struct kvrt_meta_id *ids[2] = {NULL, NULL};
	void *mem[2 * 65536 / 64];
	size_t nmem = 0;
	for (int l = 0; l < 4; l++) {
		uint32_t c = v->count[l];
		struct kvrt_meta_iter it;
		struct kvrt_meta_item r;
		if (l < 2) {
			reqs[l] = calloc(c ? c : 1, sizeof(**reqs));
			cr_assert_not_null(reqs[l]);
		} else {
			ids[l - 2] = calloc(c ? c : 1, sizeof(**ids));
			cr_assert_not_null(ids[l - 2]);
		}
		uint32_t n = 0;
		for (kvrt_meta_iter_init(&it, v, (enum kvrt_meta_list)l); kvrt_meta_iter_next(&it, &r);
		     n++) {
			cr_assert_lt(n, c);
			cr_assert_eq(r.id_hash, kvrt_meta_id_hash(r.id, r.id_len));
			struct kvrt_meta_id id = {r.id, r.id_len};
			if (l >= 2) {
				ids[l - 2][n] = id;
				continue;
			}
			struct kvrt_chunk_key *k = malloc(sizeof(*k) * r.num_keys);
			uint32_t *b = malloc(sizeof(*b) * r.num_blocks);
			cr_assert(k && b && nmem + 2 <= KVRT_ARRAY_LEN(mem));
			mem[nmem++] = k;
			mem[nmem++] = b;
			for (uint32_t i = 0; i < r.num_keys; i++)
				k[i] = kvrt_meta_item_key(&r, i);
			for (uint32_t i = 0; i < r.num_blocks; i++) {
				b[i] = kvrt_meta_item_block(&r, i);
				cr_assert(b[i] != 0 && b[i] <= KVRT_META_MAX_BLOCK);
			}
			cr_assert_lt(r.token_start, r.token_end);
			reqs[l][n] = (struct kvrt_meta_req){
				.id = id, .flags = r.flags, .token_start = r.token_start,
				.token_end = r.token_end, .last_chunk_tokens = r.last_chunk_tokens,
				.keys = k, .num_keys = r.num_keys, .block_ids = b,
				.num_blocks = r.num_blocks};
		}
		cr_assert_eq(n, c);
	}
	p.loads = reqs[0];
	p.num_loads = v->count[0];
	p.saves = reqs[1];
	p.num_saves = v->count[1];
	p.preempted = ids[0];
	p.num_preempted = v->count[2];
	p.finished = ids[1];
	p.num_finished = v->count[3];
	uint8_t *again = malloc(len);
	cr_assert_not_null(again);
	size_t got = 0;
	cr_assert_eq(kvrt_meta_encode(&p, again, len, &got), 0, "accepted plan breaks a rule");
	cr_assert_eq(got, len);
	cr_assert(!memcmp(again, buf, len), "re-encoding an accepted message differs");
	free(again);
	for (size_t i = 0; i < nmem; i++)
		free(mem[i]);
	free(reqs[0]);
	free(reqs[1]);
	free(ids[0]);
	free(ids[1]);
}

/* Decode a mutated message: rejected, or accepted and self-consistent. */
static int check_mutant(const uint8_t *buf, size_t len)
{
	uint8_t *b = malloc(len ? len : 1);
	cr_assert_not_null(b);
	memcpy(b, buf, len);
	struct kvrt_meta_view v;
	int rc = kvrt_meta_decode(b, len, &v);
	cr_assert(rc == 0 || rc == -EBADMSG, "decode returned %d", rc);
	if (rc == 0)
		expect_self_consistent(b, len, &v);
	free(b);
	return rc;
}

/* --- tests ------------------------------------------------------------------- */

/* A random plan (gen_plan) and its encoding (encode_new). */
static uint8_t *gen_encoded(uint64_t *s, struct gen *g, size_t *len)
{
	gen_plan(s, g);
	return encode_new(&g->plan, len);
}

Test(meta, empty_plan)
{
	struct kvrt_meta_plan p = {.step = 7, .block_size = 16, .chunk_size = 256};
	uint8_t buf[KVRT_META_HEADER_SIZE];
	size_t len = 0;
	cr_assert_eq(kvrt_meta_encode(&p, buf, sizeof(buf), &len), 0);
	cr_assert_eq(len, KVRT_META_HEADER_SIZE);
	cr_expect(!memcmp(buf, "KVRM", 4));
	cr_expect_eq(buf[4], 1);
	cr_expect_eq(buf[6], KVRT_META_HEADER_SIZE);
	expect_round_trip(&p, buf, len);
	cr_expect_eq(kvrt_meta_encode(&p, buf, sizeof(buf) - 1, &len), -ENOSPC);
	cr_expect_eq(len, KVRT_META_HEADER_SIZE);
}

/* A hand-built plan, checked against the documented byte layout. */
Test(meta, layout_matches_header_doc)
{
	const struct kvrt_chunk_key keys[2] = {{0x0102030405060708ull, 0x1112131415161718ull},
					       {0x2122232425262728ull, 0x3132333435363738ull}};
	const uint32_t blocks[3] = {5, 9, 0x01020304};
	/* Tokens 16 (after a local hit of one block) to 46: chunk 0, blocks 1 and 2. */
	struct kvrt_meta_req load = {.id = {"req-1", 5}, .flags = KVRT_META_ASYNC,
				     .token_start = 16, .token_end = 46,
				     .last_chunk_tokens = 256, .keys = keys, .num_keys = 1,
				     .block_ids = blocks, .num_blocks = 2};
	struct kvrt_meta_id fin = {"done", 4};
	struct kvrt_meta_plan p = {.step = 0x99, .block_size = 16, .chunk_size = 256,
				   .loads = &load, .num_loads = 1, .finished = &fin,
				   .num_finished = 1};
	uint8_t buf[256];
	size_t len;
	cr_assert_eq(kvrt_meta_encode(&p, buf, sizeof(buf), &len), 0);
	size_t want = 56 + (10 + 5 + 24 + 16 + 8) + (10 + 4);
	cr_assert_eq(len, want);
	cr_expect_eq(kvrt_get_le32(buf + 8), want);
	cr_expect_eq(kvrt_get_le64(buf + 16), XXH3_64bits(buf + 24, want - 24));
	cr_expect_eq(kvrt_get_le64(buf + 24), 0x99);
	cr_expect_eq(kvrt_get_le32(buf + 32), 16);
	cr_expect_eq(kvrt_get_le32(buf + 36), 256);
	cr_expect_eq(kvrt_get_le32(buf + 40), 1);
	cr_expect_eq(kvrt_get_le32(buf + 52), 1);
	const uint8_t *e = buf + 56;
	cr_expect_eq(kvrt_get_le64(e), XXH3_64bits("req-1", 5));
	cr_expect(e[8] == 5 && e[9] == 0 && !memcmp(e + 10, "req-1", 5));
	e += 15;
	cr_expect_eq(kvrt_get_le32(e), KVRT_META_ASYNC);
	cr_expect_eq(kvrt_get_le32(e + 4), 16);
	cr_expect_eq(kvrt_get_le32(e + 8), 46);
	cr_expect_eq(kvrt_get_le32(e + 12), 256);
	cr_expect_eq(kvrt_get_le32(e + 16), 1);
	cr_expect_eq(kvrt_get_le32(e + 20), 2);
	cr_expect(e[24] == 0x08 && e[31] == 0x01 && e[32] == 0x18 && e[39] == 0x11);
	cr_expect(e[40] == 5 && e[44] == 9);
	cr_expect(!memcmp(buf + want - 4, "done", 4));
	expect_round_trip(&p, buf, len);
}

Test(meta, random_round_trips)
{
	uint64_t s = 0x9e3779b97f4a7c15ull;
	uint64_t n = kvrt_test_scaled(3000, 100);
	for (uint64_t i = 0; i < n; i++) {
		struct gen g;
		size_t len;
		uint8_t *buf = gen_encoded(&s, &g, &len);
		expect_round_trip(&g.plan, buf, len);
		struct kvrt_meta_view v;
		cr_assert_eq(kvrt_meta_decode(buf, len, &v), 0);
		expect_self_consistent(buf, len, &v);
		free(buf);
		gen_free(&g);
	}
}

Test(meta, enospc_reports_size)
{
	uint64_t s = 42;
	struct gen g;
	size_t need;
	uint8_t *buf = gen_encoded(&s, &g, &need);
	uint8_t *small = malloc(need);
	cr_assert_not_null(small);
	for (size_t cap = 0; cap < need; cap += 1 + cap / 3) {
		size_t len = 0;
		cr_assert_eq(kvrt_meta_encode(&g.plan, small, cap, &len), -ENOSPC);
		cr_assert_eq(len, need);
	}
	free(small);
	free(buf);
	gen_free(&g);
}

Test(meta, encoder_refuses_bad_plans)
{
	const struct kvrt_chunk_key keys[3] = {{1, 2}, {3, 4}, {5, 6}};
	uint32_t blocks[40];
	for (int i = 0; i < 40; i++)
		blocks[i] = 100 + (uint32_t)i;
	/* A good save: chunks 1..2 of 256, 16-token blocks. */
	const struct kvrt_meta_req good = {.id = {"r", 1}, .token_start = 256, .token_end = 768,
					   .last_chunk_tokens = 256, .keys = keys, .num_keys = 2,
					   .block_ids = blocks, .num_blocks = 32};
	struct kvrt_meta_plan p = {.block_size = 16, .chunk_size = 256, .num_saves = 1};
	uint8_t buf[4096];
	size_t len;
	p.saves = &good;
	cr_assert_eq(kvrt_meta_encode(&p, buf, sizeof(buf), &len), 0);

	struct kvrt_meta_req bad[16];
	int n = 0;
	for (int i = 0; i < 16; i++)
		bad[i] = good;
	bad[n++].id.len = 0;
	bad[n++].id.len = KVRT_META_MAX_ID_LEN + 1;
	bad[n++].flags = KVRT_META_ASYNC;   /* a load flag on a save */
	bad[n++].flags = 1u << 7;           /* undefined */
	bad[n++].flags = KVRT_META_UNFULL;  /* but the last chunk is full */
	bad[n].token_start = 300;           /* a save must start a chunk */
	bad[n].num_blocks = 30;
	n++;
	bad[n].token_end = 700;             /* ... and end one */
	bad[n++].num_blocks = 28;
	bad[n++].num_keys = 3;              /* more keys than chunks */
	bad[n++].num_blocks = 31;           /* fewer blocks than the range */
	bad[n++].last_chunk_tokens = 0;
	bad[n++].last_chunk_tokens = 257;
	bad[n].token_end = bad[n].token_start; /* empty range */
	n++;
	bad[n++].keys = NULL;
	{
		static uint32_t zero[32];
		bad[n++].block_ids = zero; /* block 0: vLLM's null block */
	}
	for (int i = 0; i < n; i++) {
		p.saves = &bad[i];
		len = 99;
		cr_expect_eq(kvrt_meta_encode(&p, buf, sizeof(buf), &len), -EINVAL, "case %d", i);
		cr_expect_eq(len, 0);
	}
	/* Header rules. */
	p.saves = &good;
	p.block_size = 0;
	cr_expect_eq(kvrt_meta_encode(&p, buf, sizeof(buf), &len), -EINVAL);
	p.block_size = 16;
	p.chunk_size = KVRT_META_MAX_SIZE + 1;
	cr_expect_eq(kvrt_meta_encode(&p, buf, sizeof(buf), &len), -EINVAL);
	p.chunk_size = 256;
	p.num_finished = 1; /* and no array */
	cr_expect_eq(kvrt_meta_encode(&p, buf, sizeof(buf), &len), -EINVAL);
}

/* Loads may start and end inside chunks, within the last chunk's tokens. */
Test(meta, load_ranges)
{
	const struct kvrt_chunk_key keys[2] = {{1, 2}, {3, 4}};
	uint32_t blocks[40];
	for (int i = 0; i < 40; i++)
		blocks[i] = 1 + (uint32_t)i;
	struct kvrt_meta_req r = {.id = {"x", 1}, .token_start = 32, .token_end = 300,
				  .last_chunk_tokens = 100, .flags = KVRT_META_UNFULL,
				  .keys = keys, .num_keys = 2, .block_ids = blocks,
				  .num_blocks = 300 / 16 - 2 + 1};
	struct kvrt_meta_plan p = {.block_size = 16, .chunk_size = 256, .loads = &r,
				   .num_loads = 1};
	uint8_t buf[1024];
	size_t len;
	cr_expect_eq(kvrt_meta_encode(&p, buf, sizeof(buf), &len), 0);
	expect_round_trip(&p, buf, len);
	r.token_end = 357; /* past the tail's 100 tokens (256 + 100 = 356) */
	r.num_blocks = 356 / 16 - 2 + 1;
	cr_expect_eq(kvrt_meta_encode(&p, buf, sizeof(buf), &len), -EINVAL);
	r.token_end = 356;
	cr_expect_eq(kvrt_meta_encode(&p, buf, sizeof(buf), &len), 0);
	r.flags |= KVRT_META_DECODE; /* a save flag on a load */
	cr_expect_eq(kvrt_meta_encode(&p, buf, sizeof(buf), &len), -EINVAL);
}

/* A refused load (after_alloc's range did not match the lookup) carries its
 * blocks and no keys; keys, a tail or a save with the flag are refused. */
Test(meta, refused_load)
{
	const struct kvrt_chunk_key keys[2] = {{1, 2}, {3, 4}};
	uint32_t blocks[3] = {7, 8, 9};
	struct kvrt_meta_req r = {.id = {"x", 1}, .token_start = 16, .token_end = 48,
				  .last_chunk_tokens = 16, .flags = KVRT_META_REFUSED | KVRT_META_ASYNC,
				  .keys = NULL, .num_keys = 0, .block_ids = blocks, .num_blocks = 2};
	struct kvrt_meta_plan p = {.block_size = 16, .chunk_size = 16, .loads = &r, .num_loads = 1};
	uint8_t buf[1024];
	size_t len;
	cr_assert_eq(kvrt_meta_encode(&p, buf, sizeof(buf), &len), 0);
	expect_round_trip(&p, buf, len);
	r.keys = keys;
	r.num_keys = 2;
	cr_expect_eq(kvrt_meta_encode(&p, buf, sizeof(buf), &len), -EINVAL, "a refused load has no keys");
	r.keys = NULL;
	r.num_keys = 0;
	r.flags |= KVRT_META_UNFULL;
	r.last_chunk_tokens = 8;
	cr_expect_eq(kvrt_meta_encode(&p, buf, sizeof(buf), &len), -EINVAL);
	r.flags = KVRT_META_REFUSED;
	r.last_chunk_tokens = 16;
	r.num_blocks = 3;
	cr_expect_eq(kvrt_meta_encode(&p, buf, sizeof(buf), &len), -EINVAL, "block count checked");
	r.num_blocks = 2;
	p.loads = NULL;
	p.num_loads = 0;
	p.saves = &r;
	p.num_saves = 1;
	cr_expect_eq(kvrt_meta_encode(&p, buf, sizeof(buf), &len), -EINVAL, "not a save flag");
}

Test(meta, every_truncation_rejected)
{
	uint64_t s = 7;
	uint64_t plans = kvrt_test_scaled(6, 2);
	for (uint64_t k = 0; k < plans; k++) {
		struct gen g;
		size_t len;
		uint8_t *buf = gen_encoded(&s, &g, &len);
		uint8_t *t = malloc(len);
		cr_assert_not_null(t);
		struct kvrt_meta_view v;
		for (size_t n = 0; n < len; n++) {
			/* As is: the declared length no longer matches. */
			cr_assert_eq(decode_exact(buf, n, &v), -EBADMSG, "prefix %zu of %zu", n, len);
			/* Resealed (length and checksum fixed): the lists must catch it. */
			memcpy(t, buf, n);
			reseal(t, n);
			cr_assert_eq(decode_exact(t, n, &v), -EBADMSG, "resealed prefix %zu of %zu",
				     n, len);
		}
		cr_assert_eq(decode_exact(buf, len, &v), 0);
		/* A longer buffer (trailing bytes) is refused too. */
		uint8_t *longer = malloc(len + 8);
		cr_assert_not_null(longer);
		memcpy(longer, buf, len);
		memset(longer + len, 0, 8);
		cr_assert_eq(decode_exact(longer, len + 8, &v), -EBADMSG);
		reseal(longer, len + 8);
		cr_assert_eq(decode_exact(longer, len + 8, &v), -EBADMSG);
		free(longer);
		free(t);
		free(buf);
		gen_free(&g);
	}
}

Test(meta, header_fields_checked)
{
	uint64_t s = 99;
	struct gen g;
	size_t len;
	uint8_t *buf = gen_encoded(&s, &g, &len);
	uint8_t *t = malloc(len);
	cr_assert_not_null(t);
	struct kvrt_meta_view v;
	/* Header fields that must be refused even when the length and checksum
	 * are fixed: magic, version, header size, reserved, sizes, counts. */
	static const struct { size_t off; uint32_t val; } pokes[] = {
		{0, 0x4d52564b ^ 0x20}, {4, 2 | 56u << 16}, {4, 0 | 56u << 16}, {4, 1 | 55u << 16},
		{4, 1 | 57u << 16}, {4, 1}, {12, 1}, {12, 0x80000000u}, {32, 0}, {32, KVRT_META_MAX_SIZE + 1},
		{36, 0}, {36, 0xffffffffu}, {40, KVRT_META_MAX_ITEMS + 1}, {44, 0x80000000u},
		{48, 0xffffffffu}, {52, 0x7fffffffu},
	};
	for (size_t i = 0; i < KVRT_ARRAY_LEN(pokes); i++) {
		memcpy(t, buf, len);
		put32(t + pokes[i].off, pokes[i].val); /* at 4: version | header size << 16 */
		reseal(t, len);
		cr_expect_eq(decode_exact(t, len, &v), -EBADMSG, "poke %zu", i);
	}
	/* A wrong checksum alone. */
	memcpy(t, buf, len);
	t[20] ^= 1;
	cr_expect_eq(decode_exact(t, len, &v), -EBADMSG);
	/* Any single body byte changed without resealing: the checksum. */
	for (size_t off = 24; off < len; off += 1 + off / 8) {
		memcpy(t, buf, len);
		t[off] ^= 0x10;
		cr_expect_eq(decode_exact(t, len, &v), -EBADMSG, "byte %zu", off);
	}
	cr_expect_eq(kvrt_meta_decode(NULL, 0, &v), -EBADMSG);
	free(t);
	free(buf);
	gen_free(&g);
}

Test(meta, oversized_counts_rejected)
{
	/* One load then nothing else: offsets are known. */
	const struct kvrt_chunk_key keys[1] = {{1, 2}};
	const uint32_t blocks[16] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16};
	struct kvrt_meta_req r = {.id = {"abc", 3}, .token_start = 0, .token_end = 256,
				  .last_chunk_tokens = 256, .keys = keys, .num_keys = 1,
				  .block_ids = blocks, .num_blocks = 16};
	struct kvrt_meta_plan p = {.block_size = 16, .chunk_size = 256, .loads = &r,
				   .num_loads = 1};
	uint8_t buf[512], t[512];
	size_t len;
	cr_assert_eq(kvrt_meta_encode(&p, buf, sizeof(buf), &len), 0);
	const size_t item = 56, fixed = item + 10 + 3; /* the load's u32 fields start here */
	static const uint32_t huge[] = {2, 1000, KVRT_META_MAX_ITEMS, KVRT_META_MAX_ITEMS + 1,
					0x7fffffff, 0x80000000u, 0xffffffffu};
	struct kvrt_meta_view v;
	for (size_t i = 0; i < KVRT_ARRAY_LEN(huge); i++) {
		for (int l = 0; l < 4; l++) { /* list counts */
			memcpy(t, buf, len);
			put32(t + 40 + 4 * l, huge[i]);
			reseal(t, len);
			cr_expect_eq(decode_exact(t, len, &v), -EBADMSG, "count[%d]=%u", l, huge[i]);
		}
		for (int f = 0; f < 6; f++) { /* the load's fields, num_keys and num_blocks */
			if (f == 1 && huge[i] == 2)
				continue; /* token_start 2 is a valid load */
			memcpy(t, buf, len);
			put32(t + fixed + 4 * f, huge[i]);
			reseal(t, len);
			cr_expect_eq(decode_exact(t, len, &v), -EBADMSG, "field %d=%u", f, huge[i]);
		}
	}
	/* Id length: 0, too long, beyond the buffer. */
	static const uint16_t idl[] = {0, 4, 200, KVRT_META_MAX_ID_LEN + 1, 0xffff};
	for (size_t i = 0; i < KVRT_ARRAY_LEN(idl); i++) {
		memcpy(t, buf, len);
		t[item + 8] = (uint8_t)idl[i];
		t[item + 9] = (uint8_t)(idl[i] >> 8);
		reseal(t, len);
		cr_expect_eq(decode_exact(t, len, &v), -EBADMSG, "id len %u", idl[i]);
	}
	/* A wrong id hash. */
	memcpy(t, buf, len);
	t[item] ^= 1;
	reseal(t, len);
	cr_expect_eq(decode_exact(t, len, &v), -EBADMSG);
	/* A declared total beyond the buffer (not resealed: the length is the point). */
	memcpy(t, buf, len);
	put32(t + 8, (uint32_t)len + 1);
	cr_expect_eq(decode_exact(t, len, &v), -EBADMSG);
	put32(t + 8, 0xffffffffu);
	cr_expect_eq(decode_exact(t, len, &v), -EBADMSG);
	/* Block 0 and a block id above INT32_MAX. */
	const size_t bl = fixed + 24 + 16;
	memcpy(t, buf, len);
	put32(t + bl + 4, 0);
	reseal(t, len);
	cr_expect_eq(decode_exact(t, len, &v), -EBADMSG);
	put32(t + bl + 4, 0x80000000u);
	reseal(t, len);
	cr_expect_eq(decode_exact(t, len, &v), -EBADMSG);
	put32(t + bl + 4, KVRT_META_MAX_BLOCK);
	reseal(t, len);
	cr_expect_eq(decode_exact(t, len, &v), 0);
}

/* Random bit flips, resealed half of the time: never a crash or an overread;
 * rejected, or a plan that keeps every rule. */
Test(meta, bit_flips)
{
	uint64_t s = 0xfeedface;
	uint64_t rounds = kvrt_test_scaled(20000, 500);
	uint64_t accepted = 0, resealed = 0;
	for (uint64_t i = 0; i < rounds; i += 50) {
		struct gen g;
		size_t len;
		uint8_t *buf = gen_encoded(&s, &g, &len);
		uint8_t *t = malloc(len);
		cr_assert_not_null(t);
		for (int k = 0; k < 50; k++) {
			memcpy(t, buf, len);
			uint32_t flips = rnd(&s, 1, 4);
			for (uint32_t f = 0; f < flips; f++) {
				size_t bit = kvrt_test_rand(&s) % (len * 8);
				t[bit / 8] ^= (uint8_t)(1u << (bit % 8));
			}
			if (rnd(&s, 0, 1)) {
				reseal(t, len);
				resealed++;
			}
			accepted += check_mutant(t, len) == 0;
		}
		free(t);
		free(buf);
		gen_free(&g);
	}
	cr_log_info("bit flips: %llu rounds, %llu resealed, %llu accepted",
		    (unsigned long long)rounds, (unsigned long long)resealed,
		    (unsigned long long)accepted);
}

/* Mutation fuzz: flips, byte sets, interesting u32s, inserts, deletes,
 * truncations, splices; resealed most of the time so the structure checks
 * are the ones exercised. Bounded by KVRT_TEST_SCALE. */
Test(meta, fuzz_mutations)
{
	static const uint32_t interesting[] = {0, 1, 2, 15, 16, 255, 256, 257, 1023, 1024, 65535,
					       65536, 65537, 0x7fffffff, 0x80000000u, 0xfffffffeu,
					       0xffffffffu};
	uint64_t s = 0x1234567;
	uint64_t iters = kvrt_test_scaled(200000, 2000);
	uint64_t accepted = 0;
	uint8_t *t = NULL;
	size_t tcap = 0;
	for (uint64_t i = 0; i < iters;) {
		struct gen g;
		size_t len;
		uint8_t *buf = gen_encoded(&s, &g, &len);
		if (tcap < len + 64) {
			tcap = len + 64;
			t = realloc(t, tcap);
			cr_assert_not_null(t);
		}
		for (int k = 0; k < 100 && i < iters; k++, i++) {
			memcpy(t, buf, len);
			size_t n = len;
			uint32_t ops = rnd(&s, 1, 3);
			for (uint32_t o = 0; o < ops && n > 0; o++) {
				size_t at = kvrt_test_rand(&s) % n;
				switch (rnd(&s, 0, 6)) {
				case 0: /* bit flip */
					t[at] ^= (uint8_t)(1u << rnd(&s, 0, 7));
					break;
				case 1: /* byte set */
					t[at] = (uint8_t)rnd(&s, 0, 255);
					break;
				case 2: /* an interesting u32 */
					if (at + 4 <= n)
						put32(t + at, interesting[rnd(&s, 0, KVRT_ARRAY_LEN(interesting) - 1)]);
					break;
				case 3: { /* insert up to 16 bytes */
					size_t m = rnd(&s, 1, 16);
					if (n + m > tcap)
						break;
					memmove(t + at + m, t + at, n - at);
					for (size_t j = 0; j < m; j++)
						t[at + j] = (uint8_t)kvrt_test_rand(&s);
					n += m;
					break;
				}
				case 4: { /* delete up to 16 bytes */
					size_t m = rnd(&s, 1, 16);
					if (at + m > n)
						m = n - at;
					memmove(t + at, t + at + m, n - at - m);
					n -= m;
					break;
				}
				case 5: /* truncate */
					n = at;
					break;
				default: { /* copy a range over another */
					size_t from = kvrt_test_rand(&s) % n;
					size_t m = rnd(&s, 1, 32);
					if (from + m > n)
						m = n - from;
					if (at + m > n)
						m = n - at;
					memmove(t + at, t + from, m);
					break;
				}
				}
			}
			if (rnd(&s, 0, 7))
				reseal(t, n);
			accepted += check_mutant(t, n) == 0;
		}
		free(buf);
		gen_free(&g);
	}
	free(t);
	cr_log_info("fuzz: %llu mutants, %llu accepted", (unsigned long long)iters,
		    (unsigned long long)accepted);
}
