/* The chunk header codec (actors/chunk.c) and the local disk tier
 * (actors/disk.c): round trips, restart re-index, every kind of bad file,
 * files deleted under us, the budget's LRU, a full file system, back-pressure
 * on the notify actor, close draining queued writes.
 *
 * Each test works in its own mkdtemp directory under /tmp, removed at the
 * end. A collector actor is the notify target; tests wait on it for
 * completions (no sleeps for synchronisation).
 */
#include <criterion/criterion.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include "actors/chunk.h"
#include "actors/disk.h"
#include "runtime/actor.h"
#include "tests/test_util.h"

#define BASE 100u /* msg_base of the disk completions */
#define NS 0x6b7672746e73ull
#define WAIT_NS 20000000000ull /* 20 s: only a hang waits this long */

/* --- collector: the notify actor ---------------------------------------- */

#define MAX_MSGS 8192

struct collector {
	pthread_mutex_t mu;
	pthread_cond_t cv;
	struct kvrt_msg msgs[MAX_MSGS]; /* in arrival order */
	bool used[MAX_MSGS];            /* consumed by a wait */
	size_t n;                       /* received */
	_Atomic int gate_closed;        /* handler spins while set */
	struct kvrt_actor *actor;
};

static void coll_handle(struct kvrt_actor *a, struct kvrt_msg *m)
{
	struct collector *c = kvrt_actor_data(a);
	while (atomic_load(&c->gate_closed))
		usleep(200);
	pthread_mutex_lock(&c->mu);
	if (c->n < MAX_MSGS)
		c->msgs[c->n++] = *m;
	pthread_cond_broadcast(&c->cv);
	pthread_mutex_unlock(&c->mu);
}

static const struct kvrt_actor_ops coll_ops = {.handle = coll_handle};

static struct collector *coll_new(uint32_t mailbox)
{
	struct collector *c = calloc(1, sizeof *c);
	cr_assert(c);
	pthread_mutex_init(&c->mu, NULL);
	pthread_cond_init(&c->cv, NULL);
	int rc = kvrt_actor_create(&c->actor, &(struct kvrt_actor_config){
						      .name = "collector",
						      .mailbox_size = mailbox,
						      .ops = &coll_ops,
						      .data = c});
	cr_assert_eq(rc, 0);
	return c;
}

static void coll_free(struct collector *c)
{
	kvrt_actor_destroy(c->actor);
	free(c);
}

static struct kvrt_chunk_key msg_key(const struct kvrt_msg *m)
{
	return (struct kvrt_chunk_key){.lo = m->arg.u64[0], .hi = m->arg.u64[1]};
}

/* Wait for (and consume) the first unconsumed completion of event ev about
 * key k. */
static struct kvrt_msg coll_wait(struct collector *c, enum kvrt_disk_event ev,
				 struct kvrt_chunk_key k)
{
	struct timespec dl;
	clock_gettime(CLOCK_REALTIME, &dl);
	dl.tv_sec += WAIT_NS / 1000000000ull;
	pthread_mutex_lock(&c->mu);
	for (;;) {
		for (size_t i = 0; i < c->n; i++) {
			if (c->used[i] || c->msgs[i].type != BASE + ev ||
			    !kvrt_chunk_key_eq(msg_key(&c->msgs[i]), k))
				continue;
			c->used[i] = true;
			struct kvrt_msg m = c->msgs[i];
			pthread_mutex_unlock(&c->mu);
			return m;
		}
		int rc = pthread_cond_timedwait(&c->cv, &c->mu, &dl);
		if (rc == ETIMEDOUT) {
			pthread_mutex_unlock(&c->mu);
			cr_assert_fail("no completion of event %d for key %016lx%016lx", ev,
				       (unsigned long)k.hi, (unsigned long)k.lo);
		}
	}
}

/* Unconsumed completions of event ev. */
static size_t coll_count(struct collector *c, enum kvrt_disk_event ev)
{
	size_t n = 0;
	pthread_mutex_lock(&c->mu);
	for (size_t i = 0; i < c->n; i++)
		n += !c->used[i] && c->msgs[i].type == BASE + ev;
	pthread_mutex_unlock(&c->mu);
	return n;
}

/* --- chunks ----------------------------------------------------------------- */

struct chunk {
	struct kvrt_chunk_header h;
	uint8_t *payload;
};

static void fill_random(uint8_t *p, size_t n, uint64_t *rng)
{
	size_t i = 0;
	for (; i + 8 <= n; i += 8) {
		uint64_t r = kvrt_test_rand(rng);
		memcpy(p + i, &r, 8);
	}
	uint64_t r = kvrt_test_rand(rng);
	for (; i < n; i++, r >>= 8)
		p[i] = (uint8_t)r;
}

/* A random chunk of namespace ns, payload at most about max_bytes. */
static struct chunk mk_chunk(uint64_t ns, uint64_t *rng, uint64_t max_bytes)
{
	struct chunk c = {0};
	struct kvrt_chunk_header *h = &c.h;
	h->format_version = KVRT_CHUNK_FORMAT_VERSION;
	h->header_size = KVRT_CHUNK_HEADER_SIZE;
	h->namespace_hash = ns;
	h->key.lo = kvrt_test_rand(rng);
	h->key.hi = kvrt_test_rand(rng);
	h->shape.elem_size = 2;
	h->shape.num_layers = 1 + (uint32_t)(kvrt_test_rand(rng) % 4);
	h->shape.token_bytes = 2 * (1 + (uint32_t)(kvrt_test_rand(rng) % 300));
	h->shape.layout = 7;
	uint64_t per_tok = (uint64_t)h->shape.num_layers * h->shape.token_bytes;
	uint64_t maxtok = max_bytes / per_tok;
	if (maxtok > 256)
		maxtok = 256;
	if (maxtok < 1)
		maxtok = 1;
	h->num_tokens = 1 + (uint32_t)(kvrt_test_rand(rng) % maxtok);
	h->payload_len = kvrt_chunk_payload_bytes(&h->shape, h->num_tokens);
	c.payload = malloc(h->payload_len);
	cr_assert(c.payload);
	fill_random(c.payload, h->payload_len, rng);
	return c;
}

/* A chunk of exactly nlayers * ntok * tb bytes. */
static struct chunk mk_chunk_sized(uint64_t ns, uint64_t *rng, uint32_t nlayers, uint32_t ntok,
				   uint32_t tb)
{
	struct chunk c = mk_chunk(ns, rng, 16);
	free(c.payload);
	c.h.shape.num_layers = nlayers;
	c.h.num_tokens = ntok;
	c.h.shape.token_bytes = tb;
	c.h.payload_len = kvrt_chunk_payload_bytes(&c.h.shape, ntok);
	c.payload = malloc(c.h.payload_len);
	cr_assert(c.payload);
	fill_random(c.payload, c.h.payload_len, rng);
	return c;
}

/* --- directories --------------------------------------------------------------- */

static int rm_cb(const char *p, const struct stat *sb, int flag, struct FTW *ftw)
{
	(void)sb;
	(void)flag;
	(void)ftw;
	return remove(p);
}

static void rm_rf(const char *dir)
{
	nftw(dir, rm_cb, 16, FTW_DEPTH | FTW_PHYS);
}

static char *tmp_dir(void)
{
	char *t = strdup("/tmp/kvrt-test-disk-XXXXXX");
	cr_assert(mkdtemp(t));
	return t;
}

static void chunk_path(const char *dir, struct kvrt_chunk_key k, const char *ext, char *out,
		       size_t n)
{
	snprintf(out, n, "%s/%02x/%016lx%016lx%s", dir, (unsigned)(k.hi >> 56), (unsigned long)k.hi,
		 (unsigned long)k.lo, ext);
}

/* Make the subdirectory a file of key k goes into. */
static void mk_sub(const char *dir, struct kvrt_chunk_key k)
{
	char p[512];
	snprintf(p, sizeof p, "%s/%02x", dir, (unsigned)(k.hi >> 56));
	mkdir(p, 0700);
}

static bool exists(const char *p)
{
	struct stat st;
	return stat(p, &st) == 0;
}

/* Files ending in ext anywhere under dir. */
static int count_files(const char *dir, const char *ext)
{
	int n = 0;
	for (unsigned b = 0; b < 256; b++) {
		char sub[512];
		snprintf(sub, sizeof sub, "%s/%02x", dir, b);
		DIR *dp = opendir(sub);
		if (!dp)
			continue;
		for (struct dirent *de; (de = readdir(dp));) {
			size_t l = strlen(de->d_name), el = strlen(ext);
			n += l > el && !strcmp(de->d_name + l - el, ext);
		}
		closedir(dp);
	}
	return n;
}

/* --- the disk under test ------------------------------------------------------- */

#define MAX_FOUND 1024
static struct kvrt_chunk_header found[MAX_FOUND];
static size_t nfound;

static void on_found(void *ctx, const struct kvrt_chunk_header *h)
{
	(void)ctx;
	if (nfound < MAX_FOUND)
		found[nfound++] = *h;
}

static struct kvrt_disk *open_disk(const char *dir, struct collector *c, uint64_t budget,
				   bool odirect)
{
	struct kvrt_disk *d;
	nfound = 0;
	int rc = kvrt_disk_open(&d, &(struct kvrt_disk_config){.dir = dir,
							       .budget_bytes = budget,
							       .namespace_hash = NS,
							       .notify = c->actor,
							       .msg_base = BASE,
							       .on_found = on_found,
							       .use_odirect = odirect});
	cr_assert_eq(rc, 0, "kvrt_disk_open(%s): %s", dir, strerror(-rc));
	return d;
}

/* Write and wait; returns WRITTEN's status. */
static int write_sync(struct kvrt_disk *d, struct collector *c, const struct chunk *ch)
{
	int rc = kvrt_disk_write(d, &ch->h, ch->payload, 42);
	cr_assert_eq(rc, 0, "kvrt_disk_write: %s", strerror(-rc));
	struct kvrt_msg m = coll_wait(c, KVRT_DISK_WRITTEN, ch->h.key);
	cr_assert_eq(m.arg.u64[3], 42u, "cookie echoed");
	return (int)m.arg.i64[2];
}

/* Read into a poisoned buffer and wait; returns READ_DONE's status; on 0
 * checks every byte. */
static int read_check(struct kvrt_disk *d, struct collector *c, const struct chunk *ch,
		      bool aligned)
{
	uint64_t len = ch->h.payload_len;
	uint64_t cap = (len + 4095) & ~4095ull;
	uint8_t *mem = aligned_alloc(4096, cap + 4096);
	cr_assert(mem);
	uint8_t *dst = aligned ? mem : mem + 8;
	memset(dst, 0xa5, cap);
	uint64_t cookie = ch->h.key.lo ^ 0x77;
	int rc = kvrt_disk_read(d, ch->h.key, dst, cap, cookie);
	cr_assert_eq(rc, 0, "kvrt_disk_read: %s", strerror(-rc));
	struct kvrt_msg m = coll_wait(c, KVRT_DISK_READ_DONE, ch->h.key);
	cr_assert_eq(m.arg.u64[3], cookie);
	int st = (int)m.arg.i64[2];
	if (st == 0) {
		cr_assert_eq(m.arg.u64[4], len, "bytes read");
		cr_assert(memcmp(dst, ch->payload, len) == 0, "payload differs after round trip");
	} else if (len >= 64) {
		cr_assert(memcmp(dst, ch->payload, len) != 0, "failed read left valid bytes");
	}
	free(mem);
	return st;
}

/* --- header codec ----------------------------------------------------------------- */

static struct kvrt_chunk_header good_header(void)
{
	return (struct kvrt_chunk_header){
		.format_version = KVRT_CHUNK_FORMAT_VERSION,
		.header_size = KVRT_CHUNK_HEADER_SIZE,
		.namespace_hash = 0x1122334455667788ull,
		.key = {.lo = 0x0102030405060708ull, .hi = 0xf0e0d0c0b0a09080ull},
		.shape = {.num_layers = 32, .token_bytes = 2048, .elem_size = 2, .layout = 3},
		.num_tokens = 256,
		.flags = 0,
		.payload_len = 32ull * 256 * 2048,
		.checksum = 0xdeadbeefcafef00dull,
	};
}

/* A disk tier in a fresh directory, its completions collected. */
struct drig {
	char *dir;
	struct collector *c;
	struct kvrt_disk *d;
};

static struct drig drig_up(uint32_t mailbox, uint64_t budget, bool odirect)
{
	struct drig g = {.dir = tmp_dir()};
	g.c = coll_new(mailbox);
	g.d = open_disk(g.dir, g.c, budget, odirect);
	return g;
}

/* After the test closed g->d: the collector and the directory go. */
static void drig_down(struct drig *g)
{
	coll_free(g->c);
	rm_rf(g->dir);
	free(g->dir);
}

Test(chunk_header, round_trip_and_layout)
{
	struct kvrt_chunk_header h = good_header(), o;
	uint8_t b[KVRT_CHUNK_HEADER_SIZE];
	memset(b, 0x5a, sizeof b);
	kvrt_chunk_header_encode(&h, b);
	cr_assert(memcmp(b, "KVRTCHK1", 8) == 0);
	/* Little-endian, at the documented offsets. */
	cr_assert_eq(b[24], 0x08);
	cr_assert_eq(b[31], 0x01);
	cr_assert_eq(b[32], 0x80);
	cr_assert_eq(b[72], 0x0d);
	cr_assert_eq(b[79], 0xde);
	memset(&o, 0x5a, sizeof o);
	cr_assert_eq(kvrt_chunk_header_decode(b, sizeof b, &o), 0);
	cr_assert(memcmp(&o, &h, sizeof h) == 0);
	/* Longer input is fine: the header is a prefix. */
	uint8_t big[200] = {0};
	memcpy(big, b, sizeof b);
	cr_assert_eq(kvrt_chunk_header_decode(big, sizeof big, &o), 0);
}

static int decode_mutated(void (*mut)(struct kvrt_chunk_header *h))
{
	struct kvrt_chunk_header h = good_header(), o = {0};
	mut(&h);
	uint8_t b[KVRT_CHUNK_HEADER_SIZE];
	kvrt_chunk_header_encode(&h, b);
	struct kvrt_chunk_header before = o;
	int rc = kvrt_chunk_header_decode(b, sizeof b, &o);
	if (rc)
		cr_assert(memcmp(&o, &before, sizeof o) == 0, "output touched on failure");
	return rc;
}

static void m_version(struct kvrt_chunk_header *h) { h->format_version = 2; }
static void m_hsize(struct kvrt_chunk_header *h) { h->header_size = 96; }
static void m_flags(struct kvrt_chunk_header *h) { h->flags = 1; }
static void m_layers0(struct kvrt_chunk_header *h) { h->shape.num_layers = 0; h->payload_len = 0; }
static void m_layers_big(struct kvrt_chunk_header *h)
{
	h->shape.num_layers = KVRT_CHUNK_MAX_LAYERS + 1;
	h->payload_len = kvrt_chunk_payload_bytes(&h->shape, h->num_tokens);
}
static void m_elem3(struct kvrt_chunk_header *h) { h->shape.elem_size = 3; }
static void m_elem0(struct kvrt_chunk_header *h) { h->shape.elem_size = 0; }
static void m_tb0(struct kvrt_chunk_header *h) { h->shape.token_bytes = 0; h->payload_len = 0; }
static void m_tb_odd(struct kvrt_chunk_header *h)
{
	h->shape.token_bytes = 2047;
	h->payload_len = kvrt_chunk_payload_bytes(&h->shape, h->num_tokens);
}
static void m_tb_big(struct kvrt_chunk_header *h)
{
	h->shape.token_bytes = KVRT_CHUNK_MAX_TOKEN_BYTES + 2;
	h->payload_len = kvrt_chunk_payload_bytes(&h->shape, h->num_tokens);
}
static void m_tok0(struct kvrt_chunk_header *h) { h->num_tokens = 0; h->payload_len = 0; }
static void m_tok_big(struct kvrt_chunk_header *h)
{
	h->shape.num_layers = 1;
	h->shape.token_bytes = 2;
	h->num_tokens = KVRT_CHUNK_MAX_TOKENS + 1;
	h->payload_len = kvrt_chunk_payload_bytes(&h->shape, h->num_tokens);
}
static void m_len(struct kvrt_chunk_header *h) { h->payload_len += 1; }
static void m_len_short(struct kvrt_chunk_header *h) { h->payload_len -= 2048; }
static void m_len_huge(struct kvrt_chunk_header *h) { h->payload_len = UINT64_MAX; }
static void m_absurd_total(struct kvrt_chunk_header *h)
{
	/* Every field within its own bound, the product above 16 GiB. */
	h->shape.num_layers = KVRT_CHUNK_MAX_LAYERS;
	h->shape.token_bytes = 1u << 16;
	h->num_tokens = 1u << 10;
	h->payload_len = kvrt_chunk_payload_bytes(&h->shape, h->num_tokens);
}

Test(chunk_header, rejects_every_bad_field)
{
	struct {
		const char *what;
		void (*mut)(struct kvrt_chunk_header *h);
	} cases[] = {
		{"version", m_version},       {"header_size", m_hsize},
		{"flags", m_flags},           {"zero layers", m_layers0},
		{"too many layers", m_layers_big}, {"elem_size 3", m_elem3},
		{"elem_size 0", m_elem0},     {"token_bytes 0", m_tb0},
		{"token_bytes % elem", m_tb_odd}, {"token_bytes huge", m_tb_big},
		{"zero tokens", m_tok0},      {"too many tokens", m_tok_big},
		{"payload_len +1", m_len},    {"payload_len short", m_len_short},
		{"payload_len huge", m_len_huge}, {"payload above max", m_absurd_total},
	};
	for (size_t i = 0; i < KVRT_ARRAY_LEN(cases); i++)
		cr_expect_eq(decode_mutated(cases[i].mut), -EBADMSG, "%s accepted", cases[i].what);
}

Test(chunk_header, rejects_bad_magic_and_short_input)
{
	struct kvrt_chunk_header h = good_header(), o;
	uint8_t b[KVRT_CHUNK_HEADER_SIZE];
	kvrt_chunk_header_encode(&h, b);
	for (size_t len = 0; len < KVRT_CHUNK_HEADER_SIZE; len += 7)
		cr_expect_eq(kvrt_chunk_header_decode(b, len, &o), -EBADMSG, "len %zu", len);
	cr_expect_eq(kvrt_chunk_header_decode(b, KVRT_CHUNK_HEADER_SIZE - 1, &o), -EBADMSG);
	cr_expect_eq(kvrt_chunk_header_decode(NULL, 80, &o), -EBADMSG);
	for (int i = 0; i < 8; i++) {
		uint8_t c[KVRT_CHUNK_HEADER_SIZE];
		memcpy(c, b, sizeof c);
		c[i] ^= 0x20;
		cr_expect_eq(kvrt_chunk_header_decode(c, sizeof c, &o), -EBADMSG, "magic byte %d", i);
	}
}

Test(chunk_header, checksum_definition_and_verify)
{
	uint64_t rng = 0x1234567;
	struct kvrt_chunk_header h = good_header();
	h.shape = (struct kvrt_chunk_shape){.num_layers = 3, .token_bytes = 1000, .elem_size = 2};
	h.num_tokens = 77;
	h.payload_len = kvrt_chunk_payload_bytes(&h.shape, h.num_tokens);
	uint8_t *p = malloc(h.payload_len);
	fill_random(p, h.payload_len, &rng);
	uint8_t b[KVRT_CHUNK_HEADER_SIZE];
	kvrt_chunk_header_encode(&h, b);

	/* The definition: XXH3-64 of (header with checksum zeroed) ++ payload. */
	uint8_t *cat = malloc(KVRT_CHUNK_HEADER_SIZE + h.payload_len);
	memcpy(cat, b, KVRT_CHUNK_HEADER_SIZE);
	memset(cat + KVRT_CHUNK_CHECKSUM_OFFSET, 0, 8);
	memcpy(cat + KVRT_CHUNK_HEADER_SIZE, p, h.payload_len);
	uint64_t want = XXH3_64bits(cat, KVRT_CHUNK_HEADER_SIZE + h.payload_len);
	uint64_t sum = kvrt_chunk_checksum(b, p, h.payload_len);
	cr_assert_eq(sum, want);

	/* Streaming in uneven pieces gives the same. */
	struct kvrt_chunk_sum *s = kvrt_chunk_sum_create();
	cr_assert(s);
	kvrt_chunk_sum_begin(s, b);
	for (uint64_t off = 0; off < h.payload_len;) {
		uint64_t n = 1 + kvrt_test_rand(&rng) % 5000;
		if (n > h.payload_len - off)
			n = h.payload_len - off;
		kvrt_chunk_sum_update(s, p + off, n);
		off += n;
	}
	cr_assert_eq(kvrt_chunk_sum_digest(s), want);
	kvrt_chunk_sum_destroy(s);

	/* The stored checksum field does not feed the checksum. */
	kvrt_chunk_header_set_checksum(b, sum);
	cr_assert_eq(kvrt_chunk_checksum(b, p, h.payload_len), want);

	struct kvrt_chunk_header o;
	cr_assert_eq(kvrt_chunk_verify(b, p, h.payload_len, &o), 0);
	cr_assert_eq(o.checksum, sum);
	/* Any flipped bit of the payload or the header fails. */
	p[h.payload_len / 3] ^= 0x10;
	cr_assert_eq(kvrt_chunk_verify(b, p, h.payload_len, NULL), -EBADMSG);
	p[h.payload_len / 3] ^= 0x10;
	b[56] ^= 1; /* num_tokens: decodes, but its length no longer matches */
	cr_assert_eq(kvrt_chunk_verify(b, p, h.payload_len, NULL), -EBADMSG);
	b[56] ^= 1;
	b[52] ^= 1; /* layout: informational, but covered by the checksum */
	cr_assert_eq(kvrt_chunk_verify(b, p, h.payload_len, NULL), -EBADMSG);
	b[52] ^= 1;
	b[75] ^= 1; /* the checksum itself */
	cr_assert_eq(kvrt_chunk_verify(b, p, h.payload_len, NULL), -EBADMSG);
	b[75] ^= 1;
	cr_assert_eq(kvrt_chunk_verify(b, p, h.payload_len - 1, NULL), -EBADMSG, "short payload");
	cr_assert_eq(kvrt_chunk_verify(b, p, h.payload_len, NULL), 0);
	free(cat);
	free(p);
}

/* --- disk ---------------------------------------------------------------------------- */

static void free_chunks(struct chunk *v, size_t n)
{
	for (size_t i = 0; i < n; i++)
		free(v[i].payload);
	free(v);
}

static void round_trip(bool odirect)
{
	struct drig g = drig_up(1024, 1ull << 32, odirect);
	struct kvrt_disk_stats st;
	kvrt_disk_stats(g.d, &st);
	if (odirect)
		cr_log_info("O_DIRECT %s on %s", st.odirect ? "in use" : "refused", g.dir);
	uint64_t rng = 0xabcdef01 + odirect;
	size_t n = kvrt_test_scaled(48, 8);
	struct chunk *v = calloc(n, sizeof *v);
	for (size_t i = 0; i < n; i++)
		v[i] = mk_chunk(NS, &rng, 1u << 20);
	/* Queue them all (back-pressure: wait for one when refused). */
	size_t waited = 0;
	for (size_t i = 0; i < n; i++) {
		int rc;
		while ((rc = kvrt_disk_write(g.d, &v[i].h, v[i].payload, 42)) == -EAGAIN) {
			struct kvrt_msg m = coll_wait(g.c, KVRT_DISK_WRITTEN, v[waited].h.key);
			cr_assert_eq(m.arg.i64[2], 0);
			waited++;
		}
		cr_assert_eq(rc, 0);
	}
	for (; waited < n; waited++) {
		struct kvrt_msg m = coll_wait(g.c, KVRT_DISK_WRITTEN, v[waited].h.key);
		cr_assert_eq(m.arg.i64[2], 0, "write %zu: %s", waited, strerror((int)-m.arg.i64[2]));
		cr_assert_eq(m.arg.u64[4], v[waited].h.payload_len);
	}
	for (size_t i = 0; i < n; i++)
		cr_assert_eq(read_check(g.d, g.c, &v[i], i % 2 == 0), 0, "read %zu", i);
	kvrt_disk_stats(g.d, &st);
	cr_assert_eq(st.files, n);
	cr_assert_eq(st.writes, n);
	cr_assert_eq(st.reads, n);
	cr_assert_eq(st.err_corrupt + st.err_io + st.err_missing + st.notify_lost, 0);
	/* A key never written: a miss. */
	struct chunk other = mk_chunk(NS, &rng, 4096);
	cr_assert_eq(read_check(g.d, g.c, &other, true), -ENOENT);
	/* A second write of the same key is a no-op success. */
	cr_assert_eq(write_sync(g.d, g.c, &v[0]), 0);
	cr_assert_eq(count_files(g.dir, ".kvc"), (int)n);
	kvrt_disk_close(g.d);
	cr_assert_eq(count_files(g.dir, ".tmp"), 0);
	free(other.payload);
	free_chunks(v, n);
	drig_down(&g);
}

Test(disk, round_trip_buffered)
{
	round_trip(false);
}

Test(disk, round_trip_odirect)
{
	round_trip(true);
}

/* Chunks larger than one 8 MiB I/O step, with a tail that is not a multiple
 * of 4 KiB, aligned and unaligned, buffered and O_DIRECT. */
Test(disk, large_chunks_in_steps)
{
	char *dir = tmp_dir();
	struct collector *c = coll_new(64);
	uint64_t rng = 77;
	for (int od = 0; od < 2; od++) {
		struct kvrt_disk *d = open_disk(dir, c, 1ull << 32, od);
		struct chunk ch = mk_chunk_sized(NS, &rng, 5, 1000 + od, 4002); /* ~20 MB */
		cr_assert_eq(write_sync(d, c, &ch), 0);
		cr_assert_eq(read_check(d, c, &ch, true), 0);
		cr_assert_eq(read_check(d, c, &ch, false), 0);
		/* A buffer one byte too small: refused, file kept. */
		uint8_t *small = malloc(ch.h.payload_len - 1);
		cr_assert_eq(kvrt_disk_read(d, ch.h.key, small, ch.h.payload_len - 1, 0), 0);
		struct kvrt_msg m = coll_wait(c, KVRT_DISK_READ_DONE, ch.h.key);
		cr_assert_eq(m.arg.i64[2], -EMSGSIZE);
		free(small);
		cr_assert_eq(read_check(d, c, &ch, true), 0);
		kvrt_disk_close(d);
		free(ch.payload);
	}
	coll_free(c);
	rm_rf(dir);
	free(dir);
}

static bool key_found(struct kvrt_chunk_key k)
{
	for (size_t i = 0; i < nfound; i++)
		if (kvrt_chunk_key_eq(found[i].key, k))
			return true;
	return false;
}

Test(disk, restart_reindexes_in_lru_order)
{
	struct drig g = drig_up(1024, 1ull << 32, false);
	cr_assert_eq(nfound, 0);
	uint64_t rng = 99;
	size_t n = 20;
	struct chunk *v = calloc(n, sizeof *v);
	for (size_t i = 0; i < n; i++) {
		v[i] = mk_chunk(NS, &rng, 64 << 10);
		cr_assert_eq(write_sync(g.d, g.c, &v[i]), 0);
	}
	/* Touch chunk 0: it becomes the newest. mtimes have ns resolution on
	 * ext4/tmpfs; sleep a little so the order is not a tie. */
	usleep(20000);
	cr_assert_eq(read_check(g.d, g.c, &v[0], true), 0);
	kvrt_disk_close(g.d);

	g.d = open_disk(g.dir, g.c, 1ull << 32, false);
	cr_assert_eq(nfound, n, "on_found reported %zu of %zu", nfound, n);
	for (size_t i = 0; i < n; i++) {
		cr_assert(key_found(v[i].h.key), "chunk %zu not re-indexed", i);
		cr_assert_eq(found[i == 0 ? 0 : 0].namespace_hash, NS);
	}
	/* Reported oldest first: chunk 0 was read last. */
	cr_assert(kvrt_chunk_key_eq(found[n - 1].key, v[0].h.key));
	for (size_t i = 0; i < n; i++) {
		for (size_t j = 0; j < n; j++)
			if (kvrt_chunk_key_eq(found[j].key, v[i].h.key)) {
				cr_assert_eq(found[j].payload_len, v[i].h.payload_len);
				cr_assert_eq(found[j].num_tokens, v[i].h.num_tokens);
			}
		cr_assert_eq(read_check(g.d, g.c, &v[i], false), 0, "read %zu after restart", i);
	}
	struct kvrt_disk_stats st;
	kvrt_disk_stats(g.d, &st);
	cr_assert_eq(st.found, n);
	cr_assert_eq(st.files, n);
	cr_assert_eq(st.skipped, 0);
	kvrt_disk_close(g.d);
	free_chunks(v, n);
	drig_down(&g);
}

Test(disk, second_open_of_a_directory_is_busy)
{
	char *dir = tmp_dir();
	struct collector *c = coll_new(64);
	struct kvrt_disk *d = open_disk(dir, c, 1 << 20, false), *d2 = NULL;
	int rc = kvrt_disk_open(&d2, &(struct kvrt_disk_config){.dir = dir,
								.budget_bytes = 1 << 20,
								.namespace_hash = NS,
								.notify = c->actor});
	cr_assert_eq(rc, -EBUSY);
	cr_assert_null(d2);
	kvrt_disk_close(d);
	d = open_disk(dir, c, 1 << 20, false); /* released by close */
	kvrt_disk_close(d);
	/* Bad configuration is refused with a message. */
	cr_assert_eq(kvrt_disk_open(&d2, &(struct kvrt_disk_config){.dir = dir, .notify = c->actor}),
		     -EINVAL);
	cr_assert_eq(kvrt_disk_open(&d2, &(struct kvrt_disk_config){.dir = dir, .budget_bytes = 1 << 20}),
		     -EINVAL);
	coll_free(c);
	rm_rf(dir);
	free(dir);
}

/* Flip one byte of a file at offset off. */
static void flip_byte(const char *path, off_t off)
{
	int fd = open(path, O_RDWR);
	cr_assert(fd >= 0, "%s: %s", path, strerror(errno));
	uint8_t b;
	cr_assert_eq(pread(fd, &b, 1, off), 1);
	b ^= 0x40;
	cr_assert_eq(pwrite(fd, &b, 1, off), 1);
	close(fd);
}

Test(disk, corrupt_payload_or_header_is_ebadmsg_and_dropped)
{
	struct drig g = drig_up(64, 1ull << 30, false);
	uint64_t rng = 5;
	struct chunk a = mk_chunk_sized(NS, &rng, 2, 100, 512);
	struct chunk b = mk_chunk_sized(NS, &rng, 2, 100, 512);
	struct chunk e = mk_chunk_sized(NS, &rng, 2, 100, 512);
	cr_assert_eq(write_sync(g.d, g.c, &a), 0);
	cr_assert_eq(write_sync(g.d, g.c, &b), 0);
	cr_assert_eq(write_sync(g.d, g.c, &e), 0);
	char pa[512], pb[512];
	chunk_path(g.dir, a.h.key, ".kvc", pa, sizeof pa);
	chunk_path(g.dir, b.h.key, ".kvc", pb, sizeof pb);
	flip_byte(pa, KVRT_DISK_DATA_OFFSET + a.h.payload_len / 2); /* payload */
	flip_byte(pb, 52);                                           /* header: layout */

	cr_assert_eq(read_check(g.d, g.c, &a, true), -EBADMSG);
	struct kvrt_msg m = coll_wait(g.c, KVRT_DISK_DROPPED, a.h.key);
	cr_assert_eq(m.arg.i64[2], -EBADMSG);
	cr_assert(!exists(pa), "corrupt file kept");
	cr_assert_eq(read_check(g.d, g.c, &a, true), -ENOENT, "a dropped chunk is a miss");

	cr_assert_eq(read_check(g.d, g.c, &b, false), -EBADMSG);
	coll_wait(g.c, KVRT_DISK_DROPPED, b.h.key);
	cr_assert(!exists(pb));

	cr_assert_eq(read_check(g.d, g.c, &e, true), 0, "healthy chunks still read");
	struct kvrt_disk_stats st;
	kvrt_disk_stats(g.d, &st);
	cr_assert_eq(st.err_corrupt, 2);
	cr_assert_eq(st.files, 1);
	kvrt_disk_close(g.d);
	free(a.payload);
	free(b.payload);
	free(e.payload);
	drig_down(&g);
}

Test(disk, truncated_file_fails_read_and_is_skipped_at_scan)
{
	struct drig g = drig_up(64, 1ull << 30, false);
	uint64_t rng = 6;
	struct chunk a = mk_chunk_sized(NS, &rng, 2, 64, 1024);
	struct chunk b = mk_chunk_sized(NS, &rng, 2, 64, 1024);
	struct chunk e = mk_chunk_sized(NS, &rng, 2, 64, 1024);
	cr_assert_eq(write_sync(g.d, g.c, &a), 0);
	cr_assert_eq(write_sync(g.d, g.c, &b), 0);
	cr_assert_eq(write_sync(g.d, g.c, &e), 0);
	char pa[512], pb[512], pt[512];
	chunk_path(g.dir, a.h.key, ".kvc", pa, sizeof pa);
	chunk_path(g.dir, b.h.key, ".kvc", pb, sizeof pb);
	cr_assert_eq(truncate(pa, KVRT_DISK_DATA_OFFSET + a.h.payload_len - 1), 0);
	cr_assert_eq(truncate(pb, 40), 0); /* inside the header */
	/* At read. */
	cr_assert_eq(read_check(g.d, g.c, &a, true), -EBADMSG);
	cr_assert_eq(coll_wait(g.c, KVRT_DISK_DROPPED, a.h.key).arg.i64[2], -EBADMSG);
	/* At scan: b is still indexed in this run; restart. */
	kvrt_disk_close(g.d);
	/* And a stale temp file from a crashed write. */
	chunk_path(g.dir, e.h.key, ".tmp", pt, sizeof pt);
	FILE *f = fopen(pt, "w");
	cr_assert(f);
	fputs("half a chunk", f);
	fclose(f);
	g.d = open_disk(g.dir, g.c, 1ull << 30, false);
	cr_assert_eq(nfound, 1);
	cr_assert(kvrt_chunk_key_eq(found[0].key, e.h.key));
	cr_assert(!exists(pt), "stale temp file kept");
	struct kvrt_disk_stats st;
	kvrt_disk_stats(g.d, &st);
	cr_assert_eq(st.skipped, 1);
	cr_assert_eq(read_check(g.d, g.c, &b, true), -ENOENT);
	cr_assert_eq(read_check(g.d, g.c, &e, true), 0);
	kvrt_disk_close(g.d);
	free(a.payload);
	free(b.payload);
	free(e.payload);
	drig_down(&g);
}

/* Write a chunk file by hand (as another engine would). */
static void craft_file(const char *dir, const struct chunk *ch, const char *name_override)
{
	uint8_t hb[KVRT_DISK_DATA_OFFSET] = {0};
	kvrt_chunk_header_encode(&ch->h, hb);
	kvrt_chunk_header_set_checksum(hb, kvrt_chunk_checksum(hb, ch->payload, ch->h.payload_len));
	char p[512];
	mk_sub(dir, ch->h.key);
	if (name_override)
		snprintf(p, sizeof p, "%s/%s", dir, name_override);
	else
		chunk_path(dir, ch->h.key, ".kvc", p, sizeof p);
	FILE *f = fopen(p, "wb");
	cr_assert(f, "%s: %s", p, strerror(errno));
	cr_assert_eq(fwrite(hb, 1, sizeof hb, f), sizeof hb);
	cr_assert_eq(fwrite(ch->payload, 1, ch->h.payload_len, f), ch->h.payload_len);
	fclose(f);
}

Test(disk, foreign_and_garbage_files_are_skipped_and_left)
{
	struct drig g = drig_up(64, 1ull << 30, false);
	kvrt_disk_close(g.d);
	uint64_t rng = 8;
	struct chunk mine = mk_chunk_sized(NS, &rng, 1, 10, 256);
	struct chunk foreign = mk_chunk_sized(NS ^ 1, &rng, 1, 10, 256);
	struct chunk garbage = mk_chunk_sized(NS, &rng, 1, 10, 256);
	struct chunk renamed = mk_chunk_sized(NS, &rng, 1, 10, 256);
	craft_file(g.dir, &mine, NULL);    /* a valid file by another writer: found */
	craft_file(g.dir, &foreign, NULL); /* another namespace */
	char pg[512], pf[512], pr[512], other[512], stray[512];
	chunk_path(g.dir, garbage.h.key, ".kvc", pg, sizeof pg);
	mk_sub(g.dir, garbage.h.key);
	FILE *f = fopen(pg, "wb");
	for (int i = 0; i < 9000; i++)
		fputc((int)(kvrt_test_rand(&rng) & 0xff), f);
	fclose(f);
	/* A valid chunk under another key's name. */
	chunk_path(g.dir, renamed.h.key, ".kvc", pr, sizeof pr);
	mk_sub(g.dir, renamed.h.key);
	craft_file(g.dir, &mine, NULL);
	{
		char pm[512];
		chunk_path(g.dir, mine.h.key, ".kvc", pm, sizeof pm);
		char cmd[1200];
		snprintf(cmd, sizeof cmd, "cp '%s' '%s'", pm, pr);
		cr_assert_eq(system(cmd), 0);
	}
	/* A file with a near-miss name and a stray file at the top level. */
	mk_sub(g.dir, (struct kvrt_chunk_key){0});
	snprintf(other, sizeof other, "%s/00/notachunk.kvc", g.dir);
	snprintf(stray, sizeof stray, "%s/README", g.dir);
	fclose(fopen(other, "w"));
	fclose(fopen(stray, "w"));
	chunk_path(g.dir, foreign.h.key, ".kvc", pf, sizeof pf);

	g.d = open_disk(g.dir, g.c, 1ull << 30, false);
	cr_assert_eq(nfound, 1, "found %zu", nfound);
	cr_assert(kvrt_chunk_key_eq(found[0].key, mine.h.key));
	struct kvrt_disk_stats st;
	kvrt_disk_stats(g.d, &st);
	cr_assert_eq(st.skipped, 5, "skipped %lu", (unsigned long)st.skipped);
	cr_assert(exists(pf), "a foreign file was deleted");
	cr_assert(exists(pg), "an undecodable file was deleted");
	cr_assert(exists(other) && exists(stray));
	cr_assert(!exists(pr), "a misnamed chunk of ours is deleted");
	cr_assert_eq(read_check(g.d, g.c, &mine, true), 0);
	cr_assert_eq(read_check(g.d, g.c, &foreign, true), -ENOENT);
	cr_assert_eq(read_check(g.d, g.c, &garbage, true), -ENOENT);
	kvrt_disk_close(g.d);
	free(mine.payload);
	free(foreign.payload);
	free(garbage.payload);
	free(renamed.payload);
	drig_down(&g);
}

Test(disk, file_deleted_under_us_is_enoent_and_dropped)
{
	struct drig g = drig_up(64, 1ull << 30, true);
	uint64_t rng = 9;
	struct chunk a = mk_chunk_sized(NS, &rng, 3, 50, 1000);
	cr_assert_eq(write_sync(g.d, g.c, &a), 0);
	char pa[512];
	chunk_path(g.dir, a.h.key, ".kvc", pa, sizeof pa);
	cr_assert_eq(unlink(pa), 0);
	cr_assert_eq(read_check(g.d, g.c, &a, true), -ENOENT);
	cr_assert_eq(coll_wait(g.c, KVRT_DISK_DROPPED, a.h.key).arg.i64[2], -ENOENT);
	struct kvrt_disk_stats st;
	kvrt_disk_stats(g.d, &st);
	cr_assert_eq(st.files, 0);
	cr_assert_eq(st.bytes, 0);
	/* The whole tier wiped under us (subdirectory included): writes recover. */
	char sub[600];
	snprintf(sub, sizeof sub, "%s/%02x", g.dir, (unsigned)(a.h.key.hi >> 56));
	cr_assert_eq(rmdir(sub), 0);
	cr_assert_eq(write_sync(g.d, g.c, &a), 0);
	cr_assert_eq(read_check(g.d, g.c, &a, false), 0);
	kvrt_disk_close(g.d);
	free(a.payload);
	drig_down(&g);
}

Test(disk, remove_and_cancel)
{
	struct drig g = drig_up(64, 1ull << 30, false);
	uint64_t rng = 10;
	struct chunk a = mk_chunk_sized(NS, &rng, 2, 30, 512);
	cr_assert_eq(write_sync(g.d, g.c, &a), 0);
	char pa[512];
	chunk_path(g.dir, a.h.key, ".kvc", pa, sizeof pa);
	cr_assert(exists(pa));
	cr_assert_eq(kvrt_disk_remove(g.d, a.h.key), 0);
	struct kvrt_msg m = coll_wait(g.c, KVRT_DISK_REMOVED, a.h.key);
	cr_assert_eq(m.arg.i64[2], 0);
	cr_assert_eq(m.arg.u64[4], KVRT_DISK_DATA_OFFSET + a.h.payload_len);
	cr_assert(!exists(pa));
	cr_assert_eq(kvrt_disk_remove(g.d, a.h.key), 0);
	cr_assert_eq(coll_wait(g.c, KVRT_DISK_REMOVED, a.h.key).arg.i64[2], -ENOENT);
	cr_assert_eq(read_check(g.d, g.c, &a, true), -ENOENT);
	/* A remove right behind a write: the write is cancelled or done and
	 * then removed; either way nothing stays on disk and both complete. */
	cr_assert_eq(kvrt_disk_write(g.d, &a.h, a.payload, 1), 0);
	cr_assert_eq(kvrt_disk_remove(g.d, a.h.key), 0);
	int ws = (int)coll_wait(g.c, KVRT_DISK_WRITTEN, a.h.key).arg.i64[2];
	cr_assert(ws == 0 || ws == -ECANCELED, "write status %d", ws);
	cr_assert_eq(coll_wait(g.c, KVRT_DISK_REMOVED, a.h.key).arg.i64[2], 0);
	cr_assert(!exists(pa));
	cr_assert_eq(count_files(g.dir, ".tmp"), 0);
	/* Bad headers are refused up front. */
	struct chunk bad = a;
	bad.h.payload_len++;
	cr_assert_eq(kvrt_disk_write(g.d, &bad.h, a.payload, 0), -EINVAL);
	bad = a;
	bad.h.namespace_hash ^= 1;
	cr_assert_eq(kvrt_disk_write(g.d, &bad.h, a.payload, 0), -EINVAL);
	kvrt_disk_close(g.d);
	free(a.payload);
	drig_down(&g);
}

Test(disk, budget_drops_least_recently_used)
{
	char *dir = tmp_dir();
	struct collector *c = coll_new(64);
	uint64_t rng = 11;
	struct chunk v[6];
	for (int i = 0; i < 6; i++)
		v[i] = mk_chunk_sized(NS, &rng, 2, 64, 1024); /* 128 KiB + 4 KiB file */
	uint64_t fb = KVRT_DISK_DATA_OFFSET + v[0].h.payload_len;
	struct kvrt_disk *d = open_disk(dir, c, 4 * fb + fb / 2, false);
	for (int i = 0; i < 4; i++)
		cr_assert_eq(write_sync(d, c, &v[i]), 0);
	cr_assert_eq(coll_count(c, KVRT_DISK_DROPPED), 0);
	cr_assert_eq(read_check(d, c, &v[0], true), 0); /* 0 is now the newest */
	cr_assert_eq(write_sync(d, c, &v[4]), 0);
	struct kvrt_msg m = coll_wait(c, KVRT_DISK_DROPPED, v[1].h.key);
	cr_assert_eq(m.arg.i64[2], 0);
	cr_assert_eq(m.arg.u64[4], fb);
	cr_assert_eq(write_sync(d, c, &v[5]), 0);
	coll_wait(c, KVRT_DISK_DROPPED, v[2].h.key);
	cr_assert_eq(coll_count(c, KVRT_DISK_DROPPED), 0, "dropped more than needed");
	char p[512];
	chunk_path(dir, v[1].h.key, ".kvc", p, sizeof p);
	cr_assert(!exists(p));
	struct kvrt_disk_stats st;
	kvrt_disk_stats(d, &st);
	cr_assert_eq(st.files, 4);
	cr_assert_eq(st.bytes, 4 * fb);
	cr_assert_eq(st.dropped, 2);
	cr_assert_eq(read_check(d, c, &v[1], true), -ENOENT);
	cr_assert_eq(read_check(d, c, &v[0], true), 0);
	cr_assert_eq(read_check(d, c, &v[3], true), 0);
	/* A chunk larger than the whole budget is refused, nothing dropped. */
	struct chunk huge = mk_chunk_sized(NS, &rng, 2, 400, 1024);
	cr_assert_eq(write_sync(d, c, &huge), -E2BIG);
	cr_assert_eq(coll_count(c, KVRT_DISK_DROPPED), 0);
	kvrt_disk_close(d);
	/* A lower budget at restart keeps the newest that fit. */
	d = open_disk(dir, c, 2 * fb, false);
	cr_assert_eq(nfound, 2);
	cr_assert_eq(count_files(dir, ".kvc"), 2);
	kvrt_disk_close(d);
	for (int i = 0; i < 6; i++)
		free(v[i].payload);
	free(huge.payload);
	coll_free(c);
	rm_rf(dir);
	free(dir);
}

/* A small file system: a tmpfs when mount works (we may be root), else
 * RLIMIT_FSIZE (writes past it fail with EFBIG; SIGXFSZ ignored). Criterion
 * runs each test in its own process, so the limit does not leak; the tmpfs
 * is mounted in a private mount namespace when possible, so it vanishes
 * with the process even if the test dies half-way. */
Test(disk, full_disk_fails_cleanly)
{
	char *dir = tmp_dir();
	const uint64_t fs_bytes = 3u << 20;
	bool mounted = false, limited = false;
	char opts[64];
	snprintf(opts, sizeof opts, "size=%lu,mode=0700", (unsigned long)fs_bytes);
	if (unshare(CLONE_NEWNS) == 0)
		mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL);
	if (mount("kvrt-test", dir, "tmpfs", 0, opts) == 0) {
		mounted = true;
	} else {
		struct rlimit rl = {.rlim_cur = 1u << 20, .rlim_max = RLIM_INFINITY};
		signal(SIGXFSZ, SIG_IGN);
		if (setrlimit(RLIMIT_FSIZE, &rl) == 0)
			limited = true;
	}
	if (!mounted && !limited) {
		rm_rf(dir);
		cr_skip_test("cannot make a small file system: mount tmpfs and RLIMIT_FSIZE both refused");
	}
	cr_log_info("full disk via %s", mounted ? "tmpfs" : "RLIMIT_FSIZE");
	struct collector *c = coll_new(256);
	struct kvrt_disk *d = open_disk(dir, c, 1ull << 32, true);
	uint64_t rng = 12;
	/* 600 KB chunks: a tmpfs of 3 MiB holds 4 or 5; RLIMIT_FSIZE 1 MiB
	 * refuses every file, so first write a small one that fits. */
	struct chunk small = mk_chunk_sized(NS, &rng, 1, 16, 1024);
	cr_assert_eq(write_sync(d, c, &small), 0);
	struct chunk v[12];
	int ok = 0, failed = -1;
	for (int i = 0; i < 12; i++) {
		v[i] = mk_chunk_sized(NS, &rng, 3, 100, 2000);
		int st = write_sync(d, c, &v[i]);
		if (st == 0) {
			ok++;
			continue;
		}
		cr_assert(st == -ENOSPC || st == -EFBIG, "full disk status %d (%s)", st, strerror(-st));
		failed = i;
		break;
	}
	cr_assert(failed >= 0, "the small file system never filled");
	cr_assert_eq(count_files(dir, ".tmp"), 0, "a temp file was left behind");
	char p[512];
	chunk_path(dir, v[failed].h.key, ".kvc", p, sizeof p);
	cr_assert(!exists(p), "a failed write left a file");
	struct kvrt_disk_stats st;
	kvrt_disk_stats(d, &st);
	cr_assert_eq(st.err_nospace, 1);
	cr_assert_eq(st.files, (uint64_t)ok + 1);
	/* Everything written before still reads back, and the failed key is a miss. */
	cr_assert_eq(read_check(d, c, &small, true), 0);
	for (int i = 0; i < ok; i++)
		cr_assert_eq(read_check(d, c, &v[i], i & 1), 0);
	cr_assert_eq(read_check(d, c, &v[failed], true), -ENOENT);
	/* Freeing room lets writes succeed again. */
	if (ok > 0) {
		cr_assert_eq(kvrt_disk_remove(d, v[0].h.key), 0);
		cr_assert_eq(coll_wait(c, KVRT_DISK_REMOVED, v[0].h.key).arg.i64[2], 0);
		cr_assert_eq(write_sync(d, c, &v[failed]), 0);
		cr_assert_eq(read_check(d, c, &v[failed], true), 0);
	}
	kvrt_disk_close(d);
	for (int i = 0; i <= failed; i++)
		free(v[i].payload);
	free(small.payload);
	coll_free(c);
	if (mounted)
		umount2(dir, MNT_DETACH);
	rm_rf(dir);
	free(dir);
}

/* The notify actor is stuck with a 4-slot mailbox: the disk keeps serving
 * and delivers every completion, in order, once it drains. */
Test(disk, full_notify_mailbox_loses_nothing)
{
	struct drig g = drig_up(4, 1ull << 30, false);
	uint64_t rng = 13;
	struct chunk a = mk_chunk_sized(NS, &rng, 1, 8, 512);
	cr_assert_eq(write_sync(g.d, g.c, &a), 0);
	atomic_store(&g.c->gate_closed, 1);
	const int n = 40;
	uint8_t *buf = malloc((size_t)n * a.h.payload_len);
	for (int i = 0; i < n; i++) {
		/* Reads of a (hits) and of missing keys alternate. */
		struct kvrt_chunk_key k = a.h.key;
		if (i & 1)
			k.lo += (uint64_t)i;
		cr_assert_eq(kvrt_disk_read(g.d, k, buf + (size_t)i * a.h.payload_len,
					    a.h.payload_len, (uint64_t)i),
			     0);
	}
	/* Wait until the disk actor has queued them behind the stuck mailbox. */
	struct kvrt_disk_stats st;
	for (int t = 0; t < 20000; t++) {
		kvrt_disk_stats(g.d, &st);
		if (st.reads + st.err_missing == (uint64_t)n)
			break;
		usleep(500);
	}
	cr_assert_eq(st.reads + st.err_missing, (uint64_t)n);
	cr_assert_gt(st.notify_delayed, 0);
	atomic_store(&g.c->gate_closed, 0);
	for (int i = 0; i < n; i++) {
		struct kvrt_chunk_key k = a.h.key;
		if (i & 1)
			k.lo += (uint64_t)i;
		struct kvrt_msg m = coll_wait(g.c, KVRT_DISK_READ_DONE, k);
		cr_assert_eq(m.arg.u64[3], (uint64_t)i, "in order");
		cr_assert_eq(m.arg.i64[2], (i & 1) ? -ENOENT : 0);
		if (!(i & 1))
			cr_assert(memcmp(buf + (size_t)i * a.h.payload_len, a.payload,
					 a.h.payload_len) == 0);
	}
	kvrt_disk_stats(g.d, &st);
	cr_assert_eq(st.notify_lost, 0);
	kvrt_disk_close(g.d);
	free(buf);
	free(a.payload);
	drig_down(&g);
}

/* Close right after queueing writes: each is finished and reported, and a
 * restart finds them all. */
Test(disk, close_drains_queued_writes)
{
	struct drig g = drig_up(1024, 1ull << 32, false);
	uint64_t rng = 14;
	size_t n = 16;
	struct chunk *v = calloc(n, sizeof *v);
	for (size_t i = 0; i < n; i++) {
		v[i] = mk_chunk(NS, &rng, 2u << 20);
		cr_assert_eq(kvrt_disk_write(g.d, &v[i].h, v[i].payload, i), 0);
	}
	kvrt_disk_close(g.d);
	for (size_t i = 0; i < n; i++)
		cr_assert_eq(coll_wait(g.c, KVRT_DISK_WRITTEN, v[i].h.key).arg.i64[2], 0);
	g.d = open_disk(g.dir, g.c, 1ull << 32, false);
	cr_assert_eq(nfound, n);
	for (size_t i = 0; i < n; i++)
		cr_assert_eq(read_check(g.d, g.c, &v[i], true), 0);
	kvrt_disk_close(g.d);
	free_chunks(v, n);
	drig_down(&g);
}
