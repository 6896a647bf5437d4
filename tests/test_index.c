/* tests/test_index.c: the chunk index (actors/index.h): lookups that stop at
 * the first miss, pins that keep entries alive, owner release on every path,
 * and lock-free readers on other threads while the writer inserts and
 * retires (run under TSan and ASan by `ninja test`). */
#include <criterion/criterion.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <string.h>

#include "actors/index.h"
#include "tests/test_util.h"

static struct kvrt_chunk_key key_of(uint64_t i)
{
	/* Keys like the real ones: uniform bits, distinct. */
	uint64_t s = i * 0x9e3779b97f4a7c15ull + 1;
	struct kvrt_chunk_key k;
	k.lo = kvrt_test_rand(&s);
	k.hi = kvrt_test_rand(&s);
	return k;
}

/* Fields a reader can check: derived from the key. */
static uint64_t sum_of(struct kvrt_chunk_key k)
{
	return k.lo ^ (k.hi * 3) ^ 0x5555;
}

static struct kvrt_index_entry *put(struct kvrt_index *idx, uint64_t i, enum kvrt_tier tier)
{
	struct kvrt_chunk_key k = key_of(i);
	struct kvrt_index_entry *e = kvrt_index_entry_new(idx, k, tier);
	cr_assert(e);
	e->num_tokens = 256;
	e->bytes = k.hi;
	e->checksum = sum_of(k);
	atomic_store(&e->slab, (uint32_t)i);
	cr_assert_eq(kvrt_index_insert(idx, e), 0);
	return e;
}

static struct kvrt_index *mk(uint64_t cap)
{
	struct kvrt_index *idx;
	cr_assert_eq(kvrt_index_create(&idx, &(struct kvrt_index_config){.capacity = cap}), 0);
	return idx;
}

Test(index, lookup_stops_at_first_miss)
{
	struct kvrt_index *idx = mk(16);
	struct kvrt_index_reader *r = kvrt_index_reader_open(idx);
	cr_assert(r);
	struct kvrt_chunk_key keys[8];
	for (int i = 0; i < 8; i++) {
		keys[i] = key_of(i);
		if (i != 5)
			put(idx, i, i == 2 ? KVRT_TIER_DISK : KVRT_TIER_CPU);
	}
	struct kvrt_index_hit hits[8];
	memset(hits, 0xee, sizeof(hits));
	cr_expect_eq(kvrt_index_lookup(r, keys, 8, 0, 0, hits), 5);
	for (int i = 0; i < 5; i++) {
		cr_expect(kvrt_chunk_key_eq(hits[i].entry->key, keys[i]));
		cr_expect_eq(hits[i].tier, i == 2 ? KVRT_TIER_DISK : KVRT_TIER_CPU);
		cr_expect_eq(hits[i].slab, (uint32_t)i);
	}
	/* A duplicate insert is refused and the original kept. */
	struct kvrt_index_entry *dup = kvrt_index_entry_new(idx, keys[0], KVRT_TIER_CPU);
	cr_expect_eq(kvrt_index_insert(idx, dup), -EEXIST);
	kvrt_index_entry_free(idx, dup);
	cr_expect_eq(kvrt_index_count(idx), 7);
	/* Lookups from the middle and of nothing. */
	cr_expect_eq(kvrt_index_lookup(r, keys + 6, 2, 0, 0, NULL), 2);
	cr_expect_eq(kvrt_index_lookup(r, keys + 5, 3, 0, 0, NULL), 0);
	cr_expect_eq(kvrt_index_lookup(r, keys, 0, 0, 0, NULL), 0);
	/* Retired entries are misses. */
	cr_expect(kvrt_index_try_retire(idx, kvrt_index_find(idx, keys[1])));
	cr_expect_eq(kvrt_index_lookup(r, keys, 8, 0, 0, NULL), 1);
	cr_expect_null(kvrt_index_find(idx, keys[1]));
	kvrt_index_reader_close(r);
	kvrt_index_destroy(idx);
}

Test(index, touch_orders_prefix)
{
	struct kvrt_index *idx = mk(16);
	struct kvrt_index_reader *r = kvrt_index_reader_open(idx);
	struct kvrt_chunk_key keys[4];
	struct kvrt_index_entry *e[4];
	for (int i = 0; i < 4; i++) {
		keys[i] = key_of(100 + i);
		e[i] = put(idx, 100 + i, KVRT_TIER_CPU);
	}
	/* Inserted in order: chunk 3 newest. A touch reverses that. */
	cr_expect_lt(atomic_load(&e[0]->atime), atomic_load(&e[3]->atime));
	cr_expect_eq(kvrt_index_lookup(r, keys, 4, 0, KVRT_INDEX_TOUCH, NULL), 4);
	for (int i = 0; i < 3; i++)
		cr_expect_gt(atomic_load(&e[i]->atime), atomic_load(&e[i + 1]->atime));
	cr_expect_eq(atomic_load(&e[0]->freq), 1);
	for (int i = 0; i < 5; i++)
		kvrt_index_lookup(r, keys, 1, 0, KVRT_INDEX_TOUCH, NULL);
	cr_expect_eq(atomic_load(&e[0]->freq), 3); /* saturates */
	kvrt_index_reader_close(r);
	kvrt_index_destroy(idx);
}

Test(index, pins_keep_alive)
{
	struct kvrt_index *idx = mk(16);
	struct kvrt_index_reader *r = kvrt_index_reader_open(idx);
	struct kvrt_chunk_key keys[3];
	struct kvrt_index_entry *e[3];
	for (int i = 0; i < 3; i++) {
		keys[i] = key_of(i);
		e[i] = put(idx, i, KVRT_TIER_CPU);
	}
	struct kvrt_index_hit hits[3];
	cr_assert_eq(kvrt_index_lookup(r, keys, 3, 11, KVRT_INDEX_PIN, hits), 3);
	cr_expect_eq(kvrt_index_pinned(idx), 3);
	cr_expect_eq(kvrt_index_owners(idx), 1);
	for (int i = 0; i < 3; i++) {
		cr_expect_not(kvrt_index_try_retire(idx, e[i]));
		cr_expect_not(kvrt_index_try_demote(e[i], KVRT_TIER_DISK));
		cr_expect_eq(kvrt_index_entry_tier(e[i]), KVRT_TIER_CPU);
	}
	/* Release one (loaded), the rest by owner (finished). */
	cr_expect_eq(kvrt_index_unpin(idx, 11, keys[1]), 0);
	cr_expect_eq(kvrt_index_unpin(idx, 11, keys[1]), -ENOENT);
	cr_expect_eq(kvrt_index_unpin(idx, 12, keys[0]), -ENOENT);
	cr_expect(kvrt_index_try_demote(e[1], KVRT_TIER_DISK));
	cr_expect_eq(kvrt_index_entry_tier(e[1]), KVRT_TIER_DISK);
	cr_expect_not(kvrt_index_try_demote(e[1], KVRT_TIER_DISK)); /* not CPU */
	kvrt_index_promote(e[1], 77);
	cr_expect_eq(kvrt_index_entry_tier(e[1]), KVRT_TIER_CPU);
	cr_expect_eq(atomic_load(&e[1]->slab), 77);
	cr_expect_eq(kvrt_index_unpin_owner(idx, 11), 2);
	cr_expect_eq(kvrt_index_unpin_owner(idx, 11), 0);
	cr_expect_eq(kvrt_index_pinned(idx), 0);
	cr_expect_eq(kvrt_index_owners(idx), 0);
	for (int i = 0; i < 3; i++)
		cr_expect(kvrt_index_try_retire(idx, e[i]));
	/* A dead entry cannot be pinned: the lookup misses. */
	cr_expect_eq(kvrt_index_lookup(r, keys, 3, 11, KVRT_INDEX_PIN, hits), 0);
	cr_expect_eq(kvrt_index_pinned(idx), 0);
	cr_expect_eq(kvrt_index_owners(idx), 0);
	kvrt_index_reader_close(r);
	kvrt_index_barrier(idx);
	cr_expect_eq(kvrt_index_pending_frees(idx), 0);
	kvrt_index_destroy(idx);
}

/* Every release path: single unpin (loaded), owner release (finished,
 * aborted, preempted), time-out; owners are independent; the same chunk
 * pinned by two owners stays pinned until both let go. */
Test(index, every_pin_path_releases)
{
	struct kvrt_index *idx = mk(64);
	struct kvrt_index_reader *r = kvrt_index_reader_open(idx);
	struct kvrt_chunk_key keys[8];
	struct kvrt_index_entry *e[8];
	for (int i = 0; i < 8; i++) {
		keys[i] = key_of(i);
		e[i] = put(idx, i, KVRT_TIER_CPU);
	}
	/* Owners 1..4 pin overlapping prefixes; owner 1 pins twice. */
	cr_assert_eq(kvrt_index_lookup(r, keys, 8, 1, KVRT_INDEX_PIN, NULL), 8);
	cr_assert_eq(kvrt_index_lookup(r, keys, 2, 1, KVRT_INDEX_PIN, NULL), 2);
	cr_assert_eq(kvrt_index_lookup(r, keys, 4, 2, KVRT_INDEX_PIN, NULL), 4);
	cr_assert_eq(kvrt_index_lookup(r, keys, 6, 3, KVRT_INDEX_PIN, NULL), 6);
	uint64_t t_mid = kvrt_now_ns();
	while (kvrt_now_ns() == t_mid)
		;
	cr_assert_eq(kvrt_index_lookup(r, keys, 3, 4, KVRT_INDEX_PIN, NULL), 3);
	cr_expect_eq(kvrt_index_pinned(idx), 8 + 2 + 4 + 6 + 3);
	cr_expect_eq(kvrt_index_owners(idx), 4);
	cr_expect_eq(kvrt_index_state_pins(atomic_load(&e[0]->state)), 5);

	/* Loaded: owner 2 releases its chunks one by one. */
	for (int i = 0; i < 4; i++)
		cr_expect_eq(kvrt_index_unpin(idx, 2, keys[i]), 0);
	cr_expect_eq(kvrt_index_owners(idx), 3);
	/* Aborted / preempted: owner 3 releases all. */
	cr_expect_eq(kvrt_index_unpin_owner(idx, 3), 6);
	/* Time-out: owners older than t_mid (owner 1) are released. */
	cr_expect_eq(kvrt_index_unpin_expired(idx, t_mid + 1), 10);
	cr_expect_eq(kvrt_index_owners(idx), 1);
	cr_expect_eq(kvrt_index_pinned(idx), 3);
	cr_expect_not(kvrt_index_try_retire(idx, e[2]));
	cr_expect(kvrt_index_try_retire(idx, e[7]));
	/* Finished: the last owner. */
	cr_expect_eq(kvrt_index_unpin_owner(idx, 4), 3);
	cr_expect_eq(kvrt_index_pinned(idx), 0);
	cr_expect_eq(kvrt_index_owners(idx), 0);
	for (int i = 0; i < 7; i++)
		cr_expect(kvrt_index_try_retire(idx, e[i]));
	kvrt_index_reader_close(r);
	kvrt_index_destroy(idx);
}

/* --- concurrency --------------------------------------------------------- */

#define KEYSPACE 512u

struct stress {
	struct kvrt_index *idx;
	_Atomic bool stop;
	_Atomic uint64_t lookups;
	_Atomic uint64_t pinned_ok;
	_Atomic uint64_t bad;
};

struct reader_arg {
	struct stress *s;
	uint64_t owner;
};

static void *reader_main(void *arg)
{
	struct reader_arg *ra = arg;
	struct stress *s = ra->s;
	struct kvrt_index_reader *r = kvrt_index_reader_open(s->idx);
	if (!r) {
		atomic_fetch_add(&s->bad, 1);
		return NULL;
	}
	uint64_t rs = ra->owner * 7 + 1;
	struct kvrt_chunk_key keys[8];
	struct kvrt_index_hit hits[8];
	while (!atomic_load_explicit(&s->stop, memory_order_relaxed)) {
		uint64_t first = kvrt_test_rand(&rs) % KEYSPACE;
		for (int i = 0; i < 8; i++)
			keys[i] = key_of((first + (uint64_t)i) % KEYSPACE);
		bool pin = kvrt_test_rand(&rs) & 1;
		size_t n = kvrt_index_lookup(r, keys, 8, ra->owner,
					     KVRT_INDEX_TOUCH | (pin ? KVRT_INDEX_PIN : 0), hits);
		atomic_fetch_add_explicit(&s->lookups, 1, memory_order_relaxed);
		if (!pin)
			continue;
		/* Pinned: the entries stay live and intact outside any section. */
		for (size_t i = 0; i < n; i++) {
			struct kvrt_index_entry *e = hits[i].entry;
			uint64_t st = atomic_load(&e->state);
			if ((st & KVRT_INDEX_DEAD) || !kvrt_index_state_pins(st) ||
			    !kvrt_chunk_key_eq(e->key, keys[i]) || e->checksum != sum_of(keys[i]) ||
			    e->bytes != keys[i].hi)
				atomic_fetch_add(&s->bad, 1);
		}
		atomic_fetch_add_explicit(&s->pinned_ok, n, memory_order_relaxed);
		/* Release half one by one, the rest by owner. */
		for (size_t i = 0; i < n / 2; i++)
			if (kvrt_index_unpin(s->idx, ra->owner, keys[i]))
				atomic_fetch_add(&s->bad, 1);
		kvrt_index_unpin_owner(s->idx, ra->owner);
	}
	kvrt_index_reader_close(r);
	return NULL;
}

Test(index, readers_during_writes, .timeout = 60)
{
	struct stress s = {0};
	s.idx = mk(64); /* small: forces the set to grow under readers */
	enum { READERS = 3 };
	pthread_t th[READERS];
	struct reader_arg ra[READERS];
	for (int i = 0; i < READERS; i++) {
		ra[i] = (struct reader_arg){.s = &s, .owner = 1000 + (uint64_t)i};
		cr_assert_eq(pthread_create(&th[i], NULL, reader_main, &ra[i]), 0);
	}
	/* The writer: insert keys, retire random ones (pinned ones refuse),
	 * reclaim, gc now and then. */
	struct kvrt_index_entry *live[KEYSPACE] = {0};
	uint64_t ops = kvrt_test_scaled(200000, 5000), retired = 0, refused = 0;
	uint64_t rs = 99;
	for (uint64_t op = 0; op < ops; op++) {
		uint64_t k = kvrt_test_rand(&rs) % KEYSPACE;
		if (!live[k]) {
			live[k] = put(s.idx, k, (k & 3) ? KVRT_TIER_CPU : KVRT_TIER_DISK);
		} else if (kvrt_index_try_retire(s.idx, live[k])) {
			live[k] = NULL;
			retired++;
		} else {
			refused++;
		}
		if ((op & 255) == 0)
			kvrt_index_reclaim(s.idx);
		if ((op & 16383) == 0)
			kvrt_index_gc(s.idx);
	}
	atomic_store(&s.stop, true);
	for (int i = 0; i < READERS; i++)
		pthread_join(th[i], NULL);
	cr_expect_eq(atomic_load(&s.bad), 0);
	cr_expect_gt(atomic_load(&s.lookups), 0);
	cr_expect_gt(retired, 0);
	cr_expect_eq(kvrt_index_pinned(s.idx), 0, "pins leaked: %llu",
		     (unsigned long long)kvrt_index_pinned(s.idx));
	cr_expect_eq(kvrt_index_owners(s.idx), 0);
	/* Every live entry can now be retired, and everything is freed. */
	for (unsigned k = 0; k < KEYSPACE; k++)
		if (live[k])
			cr_expect(kvrt_index_try_retire(s.idx, live[k]));
	cr_expect_eq(kvrt_index_count(s.idx), 0);
	kvrt_index_barrier(s.idx);
	cr_expect_eq(kvrt_index_pending_frees(s.idx), 0);
	cr_log_info("ops %llu retired %llu refused(pinned) %llu lookups %llu pinned %llu",
		    (unsigned long long)ops, (unsigned long long)retired, (unsigned long long)refused,
		    (unsigned long long)atomic_load(&s.lookups),
		    (unsigned long long)atomic_load(&s.pinned_ok));
	kvrt_index_destroy(s.idx);
}

/* Readers closing and reopening recycle their epoch records. */
Test(index, reader_records_recycle)
{
	struct kvrt_index *idx = mk(16);
	struct kvrt_index_reader *a = kvrt_index_reader_open(idx);
	kvrt_index_reader_close(a);
	struct kvrt_index_reader *b = kvrt_index_reader_open(idx);
	cr_expect_eq(a, b);
	kvrt_index_reader_close(b);
	kvrt_index_destroy(idx);
}
