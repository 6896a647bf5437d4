/* tests/test_evict.c: the evict actor (actors/evict.h): admission, eviction
 * order (LRU, prefix order, S3-FIFO scan resistance), watermarks, pins that
 * block eviction, back-pressure, and the disk tier underneath it (demotion,
 * promotion, restart, corrupt and missing files). */
#include <criterion/criterion.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "actors/evict.h"
#include "actors/key.h"
#include "tests/test_util.h"

#define TOKENS 16u
static const struct kvrt_chunk_shape shape = {.num_layers = 2, .token_bytes = 64, .elem_size = 2};
#define CHUNK_BYTES (2u * TOKENS * 64u) /* 2048: one 4 KiB slab */
#define NS 0x1234567890abcdefull

struct rig {
	struct kvrt_index *idx;
	struct kvrt_pool *pool;
	struct kvrt_evict *ev;
	struct kvrt_index_reader *r;
	char dir[64];
};

static struct kvrt_chunk_key key_of(uint64_t i)
{
	uint32_t t[TOKENS];
	for (uint32_t j = 0; j < TOKENS; j++)
		t[j] = (uint32_t)(i * 131 + j);
	return kvrt_key_chunk(NS, kvrt_key_root(), t, TOKENS);
}

static void fill(void *p, struct kvrt_chunk_key k)
{
	uint64_t s = k.lo ^ 0xabcdef;
	uint64_t *w = p;
	for (size_t i = 0; i < CHUNK_BYTES / 8; i++)
		w[i] = kvrt_test_rand(&s);
}

static bool check(const void *p, struct kvrt_chunk_key k)
{
	uint64_t buf[CHUNK_BYTES / 8];
	fill(buf, k);
	return !memcmp(buf, p, CHUNK_BYTES);
}

/* Tier-event ring entries of the next rig_up (0: events off). */
static uint32_t rig_events;

static void rig_up(struct rig *g, uint32_t slabs, enum kvrt_policy_kind pol, double hi, double lo,
		   bool disk)
{
	memset(g, 0, sizeof(*g));
	cr_assert_eq(kvrt_index_create(&g->idx, &(struct kvrt_index_config){.capacity = 256}), 0);
	cr_assert_eq(kvrt_pool_create(&g->pool, &(struct kvrt_pool_config){.budget_bytes = slabs * 4096ull,
									 .slab_bytes = CHUNK_BYTES,
									 .ring_size = 4}),
		     0);
	if (disk) {
		strcpy(g->dir, "/tmp/kvrt-test-evict-XXXXXX");
		cr_assert(mkdtemp(g->dir));
	}
	cr_assert_eq(kvrt_evict_create(&g->ev, &(struct kvrt_evict_config){.index = g->idx,
									    .pool = g->pool,
									    .shape = shape,
									    .namespace_hash = NS,
									    .policy = pol,
									    .high_watermark = hi,
									    .low_watermark = lo,
									    .disk_dir = disk ? g->dir : NULL,
									    .disk_budget_bytes = 1 << 20,
									    .tier_events = rig_events}),
		     0);
	g->r = kvrt_index_reader_open(g->idx);
	cr_assert(g->r);
}

static void rm_tree(const char *dir)
{
	char cmd[128];
	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
	cr_expect_eq(system(cmd), 0);
}

static void rig_down(struct rig *g, bool keep_dir)
{
	cr_expect_eq(kvrt_index_pinned(g->idx), 0, "pins leaked");
	kvrt_index_reader_close(g->r);
	kvrt_evict_destroy(g->ev);
	kvrt_pool_destroy(g->pool);
	kvrt_index_destroy(g->idx);
	if (g->dir[0] && !keep_dir)
		rm_tree(g->dir);
}

/* Take a slab (waiting for the actor's refill), fill it, admit it, sync. */
static void admit(struct rig *g, uint64_t i)
{
	uint32_t slab;
	uint64_t t0 = kvrt_now_ns();
	while (!kvrt_pool_take(g->pool, &slab)) {
		cr_assert_lt(kvrt_now_ns() - t0, 5000000000ull, "no slab");
		kvrt_evict_sync(g->ev);
	}
	fill(kvrt_pool_addr(g->pool, slab), key_of(i));
	cr_assert_eq(kvrt_evict_admit(g->ev, key_of(i), slab, TOKENS, 0), 0);
	cr_assert_eq(kvrt_evict_sync(g->ev), 0);
}

/* rig_up, then chunks 0..n-1 admitted. */
static void rig_filled(struct rig *g, uint64_t n, uint32_t slabs, enum kvrt_policy_kind pol, double hi,
		       double lo, bool disk)
{
	rig_up(g, slabs, pol, hi, lo, disk);
	for (uint64_t i = 0; i < n; i++)
		admit(g, i);
}

static bool present(struct rig *g, uint64_t i)
{
	struct kvrt_chunk_key k = key_of(i);
	return kvrt_index_lookup(g->r, &k, 1, 0, 0, NULL) == 1;
}

static enum kvrt_tier tier(struct rig *g, uint64_t i)
{
	struct kvrt_chunk_key k = key_of(i);
	struct kvrt_index_hit h;
	return kvrt_index_lookup(g->r, &k, 1, 0, 0, &h) == 1 ? h.tier : KVRT_TIER_NONE;
}

static void touch(struct rig *g, uint64_t i)
{
	struct kvrt_chunk_key k = key_of(i);
	cr_assert_eq(kvrt_index_lookup(g->r, &k, 1, 0, KVRT_INDEX_TOUCH, NULL), 1);
}

Test(evict, admit_and_read_back)
{
	struct rig g;
	rig_filled(&g, 5, 8, KVRT_POLICY_LRU, 0, 0, false);
	struct kvrt_chunk_key keys[5];
	struct kvrt_index_hit hits[5];
	for (int i = 0; i < 5; i++)
		keys[i] = key_of((uint64_t)i);
	cr_assert_eq(kvrt_index_lookup(g.r, keys, 5, 9, KVRT_INDEX_PIN, hits), 5);
	for (int i = 0; i < 5; i++) {
		cr_expect_eq(hits[i].tier, KVRT_TIER_CPU);
		cr_expect_eq(hits[i].entry->num_tokens, TOKENS);
		cr_expect_eq(hits[i].entry->bytes, CHUNK_BYTES);
		cr_expect(check(kvrt_pool_addr(g.pool, hits[i].slab), keys[i]), "chunk %d", i);
	}
	cr_expect_eq(kvrt_index_unpin_owner(g.idx, 9), 5);
	/* A duplicate admit frees its slab. */
	admit(&g, 2);
	struct kvrt_evict_stats st;
	kvrt_evict_stats(g.ev, &st);
	cr_expect_eq(st.admitted, 5);
	cr_expect_eq(st.admit_dup, 1);
	cr_expect_eq(st.cpu_entries, 5);
	cr_expect_eq(st.slabs_free, 3);
	rig_down(&g, false);
}

/* 8 slabs, high 6, low 4: the 7th chunk evicts three, least recent first. */
Test(evict, lru_order)
{
	struct rig g;
	rig_filled(&g, 6, 8, KVRT_POLICY_LRU, 0.75, 0.5, false);
	for (uint64_t i = 0; i < 6; i++)
		cr_assert(present(&g, i));
	touch(&g, 0);
	touch(&g, 2);
	admit(&g, 6);
	/* Order, oldest first: 1 3 4 5 0 2 6 -> 1, 3, 4 go. */
	bool want[7] = {true, false, true, false, false, true, true};
	for (uint64_t i = 0; i < 7; i++)
		cr_expect_eq(present(&g, i), want[i], "chunk %llu", (unsigned long long)i);
	struct kvrt_evict_stats st;
	kvrt_evict_stats(g.ev, &st);
	cr_expect_eq(st.evicted, 3);
	cr_expect_eq(st.cpu_entries, 4);
	rig_down(&g, false);
}

/* A looked-up prefix loses its later chunks first. */
Test(evict, prefix_order)
{
	struct rig g;
	rig_filled(&g, 6, 8, KVRT_POLICY_LRU, 0.75, 0.5, false);
	struct kvrt_chunk_key keys[6];
	for (int i = 0; i < 6; i++)
		keys[i] = key_of((uint64_t)i);
	cr_assert_eq(kvrt_index_lookup(g.r, keys, 6, 0, KVRT_INDEX_TOUCH, NULL), 6);
	admit(&g, 100);
	/* Three go: chunks 5, 4, 3 of the prefix; 0..2 and 100 stay. */
	for (uint64_t i = 0; i < 3; i++)
		cr_expect(present(&g, i), "chunk %llu", (unsigned long long)i);
	for (uint64_t i = 3; i < 6; i++)
		cr_expect_not(present(&g, i), "chunk %llu", (unsigned long long)i);
	cr_expect(present(&g, 100));
	rig_down(&g, false);
}

/* 20 slabs, high = low = 19: each admit past 19 evicts one. */
static uint32_t scan_survivors(enum kvrt_policy_kind pol)
{
	struct rig g;
	rig_up(&g, 20, pol, 0.95, 0.95, false);
	/* A working set of 5, re-used twice. */
	for (uint64_t i = 0; i < 5; i++)
		admit(&g, i);
	for (int round = 0; round < 2; round++)
		for (uint64_t i = 0; i < 5; i++)
			touch(&g, i);
	/* A one-time scan of 60 chunks. */
	for (uint64_t i = 1000; i < 1060; i++)
		admit(&g, i);
	uint32_t n = 0;
	for (uint64_t i = 0; i < 5; i++)
		n += present(&g, i);
	struct kvrt_evict_stats st;
	kvrt_evict_stats(g.ev, &st);
	cr_expect_eq(st.cpu_entries, 19);
	rig_down(&g, false);
	return n;
}

Test(evict, s3fifo_resists_scans)
{
	cr_expect_eq(scan_survivors(KVRT_POLICY_S3FIFO), 5);
	cr_expect_eq(scan_survivors(KVRT_POLICY_LRU), 0);
}

/* A chunk evicted from S3-FIFO's small queue and admitted again goes to main
 * (ghost hit) and survives the next scan without being touched. */
Test(evict, s3fifo_ghost)
{
	struct rig g;
	rig_up(&g, 20, KVRT_POLICY_S3FIFO, 0.95, 0.95, false);
	admit(&g, 7);
	for (uint64_t i = 1000; i < 1030; i++)
		admit(&g, i);
	cr_assert_not(present(&g, 7));
	admit(&g, 7); /* back: remembered by the ghost */
	for (uint64_t i = 2000; i < 2030; i++)
		admit(&g, i);
	cr_expect(present(&g, 7));
	rig_down(&g, false);
}

Test(evict, watermarks)
{
	struct rig g;
	rig_filled(&g, 16, 20, KVRT_POLICY_LRU, 0.8, 0.5, false);
	struct kvrt_evict_stats st;
	kvrt_evict_stats(g.ev, &st);
	cr_expect_eq(st.cpu_entries, 16); /* at high: nothing evicted */
	cr_expect_eq(st.evicted, 0);
	admit(&g, 16);
	kvrt_evict_stats(g.ev, &st);
	cr_expect_eq(st.cpu_entries, 10); /* down to low */
	cr_expect_eq(st.evicted, 7);
	for (uint64_t i = 0; i < 7; i++)
		cr_expect_not(present(&g, i));
	for (uint64_t i = 7; i < 17; i++)
		cr_expect(present(&g, i));
	rig_down(&g, false);
}

/* Pinned chunks are never evicted; a full pool of pinned chunks refuses
 * new slabs (back-pressure) instead of blocking; releasing the pins lets
 * eviction run. */
Test(evict, pinned_never_evicted)
{
	struct rig g;
	rig_up(&g, 10, KVRT_POLICY_LRU, 0.5, 0.2, false);
	struct kvrt_chunk_key keys[10];
	for (uint64_t i = 0; i < 5; i++) {
		admit(&g, i);
		keys[i] = key_of(i);
	}
	cr_assert_eq(kvrt_index_lookup(g.r, keys, 5, 42, KVRT_INDEX_PIN, NULL), 5);
	for (uint64_t i = 5; i < 8; i++)
		admit(&g, i);
	for (uint64_t i = 0; i < 5; i++)
		cr_expect(present(&g, i), "pinned chunk %llu evicted", (unsigned long long)i);
	/* Pin everything else too and fill the pool: takes fail, nothing hangs. */
	uint32_t got[10], n = 0, slab;
	for (uint64_t i = 5; i < 8; i++) {
		keys[0] = key_of(i);
		kvrt_index_lookup(g.r, keys, 1, 42, KVRT_INDEX_PIN, NULL);
	}
	for (int tries = 0; tries < 50; tries++) {
		if (kvrt_pool_take(g.pool, &slab))
			got[n++] = slab;
		kvrt_evict_sync(g.ev);
	}
	cr_expect_leq(n, 10 - 5);
	struct kvrt_evict_stats st;
	kvrt_evict_stats(g.ev, &st);
	cr_expect_gt(st.evict_blocked, 0);
	cr_expect_eq(kvrt_evict_return_slabs(g.ev, got, n > 5 ? 5 : n), 0);
	/* Release: at the high watermark nothing moves; one more chunk takes
	 * the pool above it and the pass evicts down to low (2), the new chunk
	 * kept as the most recent. */
	cr_expect_gt(kvrt_index_unpin_owner(g.idx, 42), 0);
	cr_expect_eq(kvrt_evict_run(g.ev), 0);
	kvrt_evict_stats(g.ev, &st);
	cr_expect_eq(st.cpu_entries, 5);
	admit(&g, 50);
	kvrt_evict_stats(g.ev, &st);
	cr_expect_eq(st.cpu_entries, 2, "cpu %llu free %u evicted %llu", (unsigned long long)st.cpu_entries,
		     st.slabs_free, (unsigned long long)st.evicted);
	cr_expect(present(&g, 50));
	rig_down(&g, false);
}

/* --- disk tier ----------------------------------------------------------- */

static int promote(struct rig *g, uint64_t i)
{
	struct kvrt_completion c;
	kvrt_completion_init(&c);
	int rc = kvrt_evict_promote(g->ev, key_of(i), &c);
	if (rc)
		return rc;
	cr_assert_eq(kvrt_completion_wait(&c, 10000000000ull), 0);
	return c.status;
}

/* Wait until chunk i has left the CPU tier (its disk write completed). */
static void wait_tier(struct rig *g, uint64_t i, enum kvrt_tier t)
{
	uint64_t t0 = kvrt_now_ns();
	while (tier(g, i) != t) {
		cr_assert_lt(kvrt_now_ns() - t0, 10000000000ull, "chunk %llu never reached tier %d",
			     (unsigned long long)i, t);
		kvrt_evict_sync(g->ev);
		usleep(1000);
	}
}

static bool read_back(struct rig *g, uint64_t i)
{
	struct kvrt_chunk_key k = key_of(i);
	struct kvrt_index_hit h;
	if (kvrt_index_lookup(g->r, &k, 1, 77, KVRT_INDEX_PIN, &h) != 1)
		return false;
	bool ok = kvrt_index_entry_tier(h.entry) == KVRT_TIER_CPU &&
		  check(kvrt_pool_addr(g->pool, atomic_load(&h.entry->slab)), k);
	kvrt_index_unpin_owner(g->idx, 77);
	return ok;
}

Test(evict, demote_promote_restart, .timeout = 60)
{
	struct rig g;
	rig_filled(&g, 7, 8, KVRT_POLICY_LRU, 0.75, 0.5, true);
	/* 0, 1, 2 were demoted: DISK once written. */
	for (uint64_t i = 0; i < 3; i++)
		wait_tier(&g, i, KVRT_TIER_DISK);
	for (uint64_t i = 3; i < 7; i++)
		cr_expect_eq(tier(&g, i), KVRT_TIER_CPU);
	/* Promote 1 back: same bytes. */
	cr_expect_eq(promote(&g, 1), 0);
	cr_expect_eq(tier(&g, 1), KVRT_TIER_CPU);
	cr_expect(read_back(&g, 1));
	cr_expect_eq(promote(&g, 1), 0); /* already CPU */
	cr_expect_eq(promote(&g, 999), -ENOENT);
	struct kvrt_evict_stats st;
	kvrt_evict_stats(g.ev, &st);
	cr_expect_eq(st.demoted, 3);
	cr_expect_eq(st.promoted, 1);
	rig_down(&g, true);

	/* Restart on the same directory: the disk chunks come back as DISK. */
	struct rig h;
	char dir[64];
	strcpy(dir, g.dir);
	cr_assert_eq(kvrt_index_create(&h.idx, &(struct kvrt_index_config){.capacity = 64}), 0);
	cr_assert_eq(kvrt_pool_create(&h.pool, &(struct kvrt_pool_config){.budget_bytes = 8 * 4096,
									 .slab_bytes = CHUNK_BYTES,
									 .ring_size = 4}),
		     0);
	cr_assert_eq(kvrt_evict_create(&h.ev, &(struct kvrt_evict_config){.index = h.idx,
									    .pool = h.pool,
									    .shape = shape,
									    .namespace_hash = NS,
									    .high_watermark = 0.75,
									    .low_watermark = 0.5,
									    .disk_dir = dir,
									    .disk_budget_bytes = 1 << 20,
									    .tier_events = rig_events}),
		     0);
	h.r = kvrt_index_reader_open(h.idx);
	strcpy(h.dir, dir);
	kvrt_evict_stats(h.ev, &st);
	cr_expect_geq(st.disk_found, 3);
	for (uint64_t i = 0; i < 3; i++) {
		cr_expect_eq(tier(&h, i), KVRT_TIER_DISK);
		cr_expect_eq(promote(&h, i), 0);
		cr_expect(read_back(&h, i), "chunk %llu after restart", (unsigned long long)i);
	}
	rig_down(&h, false);
}

/* Find chunk i's file (<dir>/<xx>/<hex>.kvc). */
static void file_of(struct rig *g, uint64_t i, char *path, size_t cap)
{
	char hex[33];
	kvrt_key_format(key_of(i), hex);
	snprintf(path, cap, "%s/%.2s/%s.kvc", g->dir, hex, hex);
}

Test(evict, corrupt_and_missing_files_are_misses, .timeout = 60)
{
	struct rig g;
	rig_filled(&g, 7, 8, KVRT_POLICY_LRU, 0.75, 0.5, true);
	for (uint64_t i = 0; i < 3; i++)
		wait_tier(&g, i, KVRT_TIER_DISK);
	char path[256];
	/* Flip one payload byte of chunk 0. */
	file_of(&g, 0, path, sizeof(path));
	int fd = open(path, O_RDWR);
	cr_assert_geq(fd, 0, "%s: %s", path, strerror(errno));
	unsigned char b;
	cr_assert_eq(pread(fd, &b, 1, 4096 + 100), 1);
	b ^= 0x40;
	cr_assert_eq(pwrite(fd, &b, 1, 4096 + 100), 1);
	close(fd);
	/* Delete chunk 1's file under us; truncate chunk 2's. */
	file_of(&g, 1, path, sizeof(path));
	cr_assert_eq(unlink(path), 0);
	file_of(&g, 2, path, sizeof(path));
	cr_assert_eq(truncate(path, 4096 + 1000), 0);

	int rc0 = promote(&g, 0), rc1 = promote(&g, 1), rc2 = promote(&g, 2);
	cr_expect_eq(rc0, -EBADMSG);
	cr_expect_eq(rc1, -ENOENT);
	cr_expect_eq(rc2, -EBADMSG);
	kvrt_evict_sync(g.ev);
	for (uint64_t i = 0; i < 3; i++) {
		cr_expect_not(present(&g, i), "bad chunk %llu still indexed", (unsigned long long)i);
		cr_expect_eq(promote(&g, i), -ENOENT);
	}
	struct kvrt_evict_stats st;
	kvrt_evict_stats(g.ev, &st);
	cr_expect_eq(st.promote_failed, 3);
	/* The pool did not leak the slabs of the failed reads. */
	cr_expect_eq(st.slabs_free + st.cpu_entries, st.slabs);
	rig_down(&g, false);
}

/* A chunk a load found corrupt (kvrt_evict_discard): gone from lookups at
 * once even while a load still pins it, that load's slab untouched until
 * its pin goes, a fresh copy of the key admitted meanwhile, the old slab
 * freed after; an unpinned one goes at once; both lose their disk copy. */
Test(evict, discard_drops_a_corrupt_chunk_pinned_or_not, .timeout = 60)
{
	struct rig g;
	/* 16 slabs, high 12, low 8: 13 admits demote 0..4; two promotions
	 * stay under the high watermark. */
	rig_up(&g, 16, KVRT_POLICY_LRU, 0.75, 0.5, true);
	for (uint64_t i = 0; i < 13; i++)
		admit(&g, i);
	for (uint64_t i = 0; i < 5; i++)
		wait_tier(&g, i, KVRT_TIER_DISK);
	/* 1 and 2 back in the CPU tier, each with a disk copy. */
	cr_assert_eq(promote(&g, 1), 0);
	cr_assert_eq(promote(&g, 2), 0);
	char f1[512], f2[512];
	file_of(&g, 1, f1, sizeof f1);
	file_of(&g, 2, f2, sizeof f2);
	cr_assert_eq(access(f1, F_OK), 0);
	struct kvrt_chunk_key k1 = key_of(1), k2 = key_of(2);
	struct kvrt_index_hit h;
	cr_assert_eq(kvrt_index_lookup(g.r, &k1, 1, 7, KVRT_INDEX_PIN, &h), 1);
	cr_assert_eq(h.tier, KVRT_TIER_CPU, "tier %d", h.tier);
	void *old = kvrt_pool_addr(g.pool, h.slab);
	struct kvrt_evict_stats st0, st;
	kvrt_evict_stats(g.ev, &st0);
	cr_assert_eq(kvrt_evict_discard(g.ev, k1), 0);
	cr_assert_eq(kvrt_evict_sync(g.ev), 0);
	cr_assert_not(present(&g, 1), "a discarded chunk is still found");
	cr_assert_eq(kvrt_index_lookup(g.r, &k1, 1, 8, KVRT_INDEX_PIN, NULL), 0, "pinned after discard");
	kvrt_evict_stats(g.ev, &st);
	cr_assert_eq(st.discarded, 1);
	cr_assert_eq(st.cpu_entries, st0.cpu_entries - 1);
	cr_assert_eq(st.slabs_free, st0.slabs_free, "the pinned slab was freed under its reader");
	cr_assert(check(old, k1), "the pinned slab changed");
	admit(&g, 1); /* the recompute's save: a fresh entry */
	cr_assert_eq(tier(&g, 1), KVRT_TIER_CPU);
	kvrt_evict_stats(g.ev, &st);
	cr_assert_eq(st.admit_dup, 0);
	cr_assert_eq(st.cpu_entries, st0.cpu_entries);
	cr_assert_eq(kvrt_index_unpin_owner(g.idx, 7), 1);
	cr_assert_eq(kvrt_evict_run(g.ev), 0); /* housekeeping: the old slab goes */
	kvrt_evict_stats(g.ev, &st);
	cr_assert_eq(st.slabs_free, st0.slabs_free - 1 + 1);
	/* Unpinned: at once (twice: one drop). */
	cr_assert_eq(kvrt_evict_discard(g.ev, k2), 0);
	cr_assert_eq(kvrt_evict_discard(g.ev, k2), 0);
	cr_assert_eq(kvrt_evict_sync(g.ev), 0);
	cr_assert_not(present(&g, 2));
	kvrt_evict_stats(g.ev, &st);
	cr_assert_eq(st.discarded, 2);
	cr_assert_eq(st.cpu_entries, st0.cpu_entries - 1);
	cr_assert_eq(st.slabs_free, st0.slabs_free + 1);
	uint64_t t0 = kvrt_now_ns();
	while (access(f1, F_OK) == 0 || access(f2, F_OK) == 0) {
		cr_assert_lt(kvrt_now_ns() - t0, 10000000000ull, "a discarded chunk's disk copy stays");
		usleep(1000);
	}
	rig_down(&g, false);
}

/* Replays the tier events taken so far into media[key] (keys 0..15):
 * every STORED adds a medium the chunk did not have, every REMOVED takes
 * one it had (a router's view never goes wrong). */
static void replay(struct rig *g, uint8_t *media)
{
	struct kvrt_tier_event evs[64];
	size_t n;
	while ((n = kvrt_tier_events_take(kvrt_evict_tier_events(g->ev), evs, 64)) > 0) {
		for (size_t i = 0; i < n; i++) {
			uint64_t k = UINT64_MAX;
			for (uint64_t j = 0; j < 16; j++)
				if (key_of(j).lo == evs[i].key_lo && key_of(j).hi == evs[i].key_hi)
					k = j;
			cr_assert_neq(k, UINT64_MAX, "an event for a key never admitted");
			uint8_t m = evs[i].medium;
			if (evs[i].kind == KVRT_TIER_EVENT_STORED) {
				cr_assert_not(media[k] & m, "chunk %llu stored twice in medium %u",
					      (unsigned long long)k, m);
				media[k] |= m;
			} else {
				cr_assert_eq(evs[i].kind, KVRT_TIER_EVENT_REMOVED);
				cr_assert(media[k] & m, "chunk %llu removed from medium %u it was not in",
					  (unsigned long long)k, m);
				media[k] &= (uint8_t)~m;
			}
		}
	}
}

/* KV events: what a router replays of the evict actor's tier events is
 * where each chunk is loadable from: admitted (CPU), demoted (disk only),
 * promoted (CPU and its disk copy), found corrupt (nowhere), cleared. */
Test(evict, tier_events_say_where_each_chunk_is, .timeout = 60)
{
	struct rig g;
	rig_events = 256;
	rig_up(&g, 16, KVRT_POLICY_LRU, 0.75, 0.5, true);
	uint8_t media[16] = {0};
	for (uint64_t i = 0; i < 13; i++)
		admit(&g, i);
	for (uint64_t i = 0; i < 5; i++)
		wait_tier(&g, i, KVRT_TIER_DISK);
	cr_assert_eq(kvrt_evict_sync(g.ev), 0);
	replay(&g, media);
	for (uint64_t i = 0; i < 13; i++)
		cr_assert_eq(media[i], i < 5 ? KVRT_MEDIUM_DISK : KVRT_MEDIUM_CPU, "chunk %llu: media %u",
			     (unsigned long long)i, media[i]);
	cr_assert_eq(promote(&g, 1), 0);
	cr_assert_eq(kvrt_evict_sync(g.ev), 0);
	replay(&g, media);
	cr_assert_eq(media[1], KVRT_MEDIUM_CPU | KVRT_MEDIUM_DISK);
	cr_assert_eq(kvrt_evict_discard(g.ev, key_of(1)), 0);
	replay(&g, media);
	cr_assert_eq(media[1], 0, "a chunk found corrupt is still said to be loadable");
	uint64_t dropped = 0, kept = 0;
	cr_assert_eq(kvrt_evict_clear(g.ev, &dropped, &kept), 0);
	cr_assert_eq(kept, 0);
	replay(&g, media);
	for (uint64_t i = 0; i < 16; i++)
		cr_assert_eq(media[i], 0, "chunk %llu: media %u after clear", (unsigned long long)i,
			     media[i]);
	cr_assert_eq(kvrt_tier_events_dropped(kvrt_evict_tier_events(g.ev)), 0);
	rig_down(&g, false);
}

/* A full event ring drops and counts; admits never wait for its reader.
 * With events off there is no ring. */
Test(evict, tier_events_full_ring_drops_and_counts, .timeout = 60)
{
	struct rig g;
	rig_events = 0;
	rig_up(&g, 64, KVRT_POLICY_LRU, 1.0, 0.9, false);
	cr_assert_null(kvrt_evict_tier_events(g.ev));
	rig_down(&g, false);
	rig_events = 1; /* rounded up to 64 */
	rig_up(&g, 128, KVRT_POLICY_LRU, 1.0, 0.9, false);
	for (uint64_t i = 0; i < 70; i++)
		admit(&g, i);
	struct kvrt_tier_events *te = kvrt_evict_tier_events(g.ev);
	cr_assert_eq(kvrt_tier_events_dropped(te), 7); /* 63 fit (ck keeps a slot free) */
	struct kvrt_tier_event evs[128];
	cr_assert_eq(kvrt_tier_events_take(te, evs, 128), 63);
	admit(&g, 70);
	cr_assert_eq(kvrt_tier_events_take(te, evs, 128), 1, "events stopped after a full ring");
	cr_assert_eq(evs[0].key_lo, key_of(70).lo);
	rig_down(&g, false);
}
