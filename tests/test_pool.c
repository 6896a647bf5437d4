/* tests/test_pool.c: the CPU chunk pool (actors/pool.h): budget, slabs that
 * never overlap, exhaustion as back-pressure, the hand-off ring to other
 * threads, the pin hook, and populate. */
#include <criterion/criterion.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "actors/pool.h"
#include "tests/test_util.h"

static struct kvrt_pool *mk(uint64_t budget, uint64_t slab, uint64_t region, uint32_t ring)
{
	struct kvrt_pool *p;
	cr_assert_eq(kvrt_pool_create(&p, &(struct kvrt_pool_config){.budget_bytes = budget,
								      .slab_bytes = slab,
								      .region_bytes = region,
								      .ring_size = ring}),
		     0);
	return p;
}

Test(pool, budget_and_rounding)
{
	/* 10000-byte chunks round to 12 KiB slabs; 1 MiB holds 85 of them. */
	struct kvrt_pool *p = mk(1 << 20, 10000, 100 << 10, 8);
	cr_expect_eq(kvrt_pool_slab_bytes(p), 12288);
	cr_expect_eq(kvrt_pool_slabs(p), (1 << 20) / 12288);
	struct kvrt_pool_stats st;
	kvrt_pool_stats(p, &st);
	cr_expect_eq(st.regions, (85 + 7) / 8); /* 100 KiB regions: 8 slabs each */
	cr_expect_eq(st.free, 85);
	cr_expect_eq(st.used, 0);
	kvrt_pool_destroy(p);

	struct kvrt_pool *q;
	cr_expect_eq(kvrt_pool_create(&q, &(struct kvrt_pool_config){.budget_bytes = 4095,
								      .slab_bytes = 4096}),
		     -EINVAL);
	cr_expect_eq(kvrt_pool_create(&q, &(struct kvrt_pool_config){.budget_bytes = 1 << 20}), -EINVAL);
	cr_expect_eq(kvrt_pool_create(&q, &(struct kvrt_pool_config){.budget_bytes = 1 << 20,
								      .slab_bytes = 4096,
								      .ring_size = 6}),
		     -EINVAL);
}

/* Every slab is usable, distinct, inside the budget, and 4 KiB aligned. */
Test(pool, exhaustion_no_overlap)
{
	struct kvrt_pool *p = mk(3u << 20, 64 << 10, 1 << 20, 8);
	uint32_t n = kvrt_pool_slabs(p);
	cr_assert_eq(n, 48);
	uint32_t *got = malloc(n * sizeof(*got));
	uint64_t rs = 5;
	for (uint32_t i = 0; i < n; i++) {
		got[i] = kvrt_pool_alloc(p);
		cr_assert_neq(got[i], KVRT_POOL_NO_SLAB);
		unsigned char *a = kvrt_pool_addr(p, got[i]);
		cr_expect_eq((uintptr_t)a % 4096, 0);
		/* Fill with a pattern derived from the slab. */
		uint64_t v = got[i] * 0x100000001ull + 1;
		for (size_t o = 0; o < (64 << 10); o += 8)
			memcpy(a + o, &v, 8);
	}
	/* Exhausted: no slab, nothing blocks. */
	cr_expect_eq(kvrt_pool_alloc(p), KVRT_POOL_NO_SLAB);
	uint32_t s;
	cr_expect_not(kvrt_pool_take(p, &s));
	struct kvrt_pool_stats st;
	kvrt_pool_stats(p, &st);
	cr_expect_eq(st.used, n);
	cr_expect_eq(st.take_empty, 1);
	/* No slab was overwritten by another. */
	for (uint32_t i = 0; i < n; i++) {
		unsigned char *a = kvrt_pool_addr(p, got[i]);
		uint64_t v = got[i] * 0x100000001ull + 1, w;
		for (size_t o = 0; o < (64 << 10); o += 4096) {
			memcpy(&w, a + o, 8);
			cr_assert_eq(w, v, "slab %u offset %zu", got[i], o);
		}
	}
	/* Free in random order, allocate again: the same set comes back. */
	for (uint32_t i = n - 1; i > 0; i--) {
		uint32_t j = (uint32_t)(kvrt_test_rand(&rs) % (i + 1));
		uint32_t t = got[i];
		got[i] = got[j];
		got[j] = t;
	}
	for (uint32_t i = 0; i < n; i++)
		kvrt_pool_free(p, got[i]);
	cr_expect_eq(kvrt_pool_free_count(p), n);
	uint8_t *seen = calloc(n, 1);
	for (uint32_t i = 0; i < n; i++) {
		uint32_t x = kvrt_pool_alloc(p);
		cr_assert_lt(x, n);
		cr_expect_not(seen[x]);
		seen[x] = 1;
	}
	free(seen);
	free(got);
	kvrt_pool_destroy(p);
}

/* --- the hand-off ring --------------------------------------------------- */

struct taker {
	struct kvrt_pool *p;
	_Atomic uint32_t *owner_of; /* slab -> taker id + 1 while held */
	_Atomic uint64_t *taken;
	_Atomic bool *stop;
	_Atomic uint64_t *bad;
	/* Slabs handed back to the owner (stand-in for a message). */
	uint32_t *back;
	_Atomic uint32_t *back_n;
	uint32_t id;
};

static void *taker_main(void *arg)
{
	struct taker *t = arg;
	while (!atomic_load(t->stop)) {
		uint32_t s;
		if (!kvrt_pool_take(t->p, &s))
			continue;
		uint32_t zero = 0;
		if (!atomic_compare_exchange_strong(&t->owner_of[s], &zero, t->id + 1))
			atomic_fetch_add(t->bad, 1);
		/* Write the slab: a duplicate owner would corrupt it. */
		memset(kvrt_pool_addr(t->p, s), (int)t->id, 4096);
		atomic_store(&t->owner_of[s], 0);
		atomic_fetch_add(t->taken, 1);
		uint32_t i = atomic_fetch_add(t->back_n, 1);
		__atomic_store_n(&t->back[i], s, __ATOMIC_RELEASE);
	}
	return NULL;
}

/* The owner refills; several producers take; no slab is handed out twice. */
Test(pool, ring_hand_off, .timeout = 60)
{
	struct kvrt_pool *p = mk(64 * 4096, 4096, 0, 16);
	uint32_t n = kvrt_pool_slabs(p);
	_Atomic uint32_t *owner_of = calloc(n, sizeof(*owner_of));
	_Atomic uint64_t taken = 0, bad = 0;
	_Atomic bool stop = false;
	uint64_t want = kvrt_test_scaled(20000, 500);
	uint32_t *back = malloc(want * 2 * sizeof(uint32_t) + 1024 * sizeof(uint32_t));
	_Atomic uint32_t back_n = 0;
	enum { T = 3 };
	struct taker tk[T];
	pthread_t th[T];
	for (uint32_t i = 0; i < T; i++) {
		tk[i] = (struct taker){.p = p, .owner_of = owner_of, .taken = &taken, .stop = &stop,
				       .bad = &bad, .back = back, .back_n = &back_n, .id = i};
		cr_assert_eq(pthread_create(&th[i], NULL, taker_main, &tk[i]), 0);
	}
	/* Owner loop: free what came back, refill. The back array only grows;
	 * a slot written by a taker is read here after its index is seen and
	 * its value is non-sentinel. */
	uint32_t done = 0;
	for (uint32_t i = 0; i < want * 2 + 1024; i++)
		back[i] = UINT32_MAX;
	while (atomic_load(&taken) < want) {
		uint32_t end = atomic_load(&back_n);
		while (done < end) {
			uint32_t s;
			while ((s = __atomic_load_n(&back[done], __ATOMIC_ACQUIRE)) == UINT32_MAX)
				;
			kvrt_pool_free(p, s);
			done++;
		}
		kvrt_pool_refill(p, 0);
	}
	atomic_store(&stop, true);
	for (int i = 0; i < T; i++)
		pthread_join(th[i], NULL);
	cr_expect_eq(atomic_load(&bad), 0);
	free(owner_of);
	free(back);
	kvrt_pool_destroy(p);
}

/* --- pin hook ------------------------------------------------------------ */

struct pin_log {
	int pins, unpins;
	size_t bytes;
	int fail_at; /* fail the n-th pin (1-based), 0 = never */
};

static int pin_cb(void *ctx, void *addr, size_t len)
{
	struct pin_log *l = ctx;
	(void)addr;
	if (l->fail_at && l->pins + 1 == l->fail_at)
		return -ENOMEM;
	l->pins++;
	l->bytes += len;
	return 0;
}

static void unpin_cb(void *ctx, void *addr, size_t len)
{
	struct pin_log *l = ctx;
	(void)addr;
	(void)len;
	l->unpins++;
}

Test(pool, pinned_in_regions)
{
	struct pin_log log = {0};
	struct kvrt_pool_pin_ops ops = {.pin = pin_cb, .unpin = unpin_cb, .ctx = &log};
	struct kvrt_pool *p;
	cr_assert_eq(kvrt_pool_create(&p, &(struct kvrt_pool_config){.budget_bytes = 10 << 20,
								      .slab_bytes = 1 << 20,
								      .region_bytes = 4 << 20,
								      .pin = &ops}),
		     0);
	cr_expect_eq(log.pins, 3); /* 4 + 4 + 2 slabs: one pin per region */
	cr_expect_geq(log.bytes, 10u << 20);
	struct kvrt_pool_stats st;
	kvrt_pool_stats(p, &st);
	cr_expect(st.pinned);
	kvrt_pool_destroy(p);
	cr_expect_eq(log.unpins, 3);

	/* A failed pin fails the create and unpins what was pinned. */
	struct pin_log l2 = {.fail_at = 2};
	ops.ctx = &l2;
	cr_expect_eq(kvrt_pool_create(&p, &(struct kvrt_pool_config){.budget_bytes = 10 << 20,
								      .slab_bytes = 1 << 20,
								      .region_bytes = 4 << 20,
								      .pin = &ops}),
		     -ENOMEM);
	cr_expect_eq(l2.pins, 1);
	cr_expect_eq(l2.unpins, 1);
}

/* populate: every page of the pool is resident once create returns, so no
 * step's save pays a page fault (the engine creates its pool this way). */
Test(pool, populate_faults_pages_in)
{
	struct kvrt_pool *p;
	cr_assert_eq(kvrt_pool_create(&p, &(struct kvrt_pool_config){.budget_bytes = 4u << 20,
								      .slab_bytes = 64 << 10,
								      .populate = true,
								      .no_hugetlb = true}),
		     0);
	long pg = sysconf(_SC_PAGESIZE);
	for (uint32_t s = 0; s < kvrt_pool_slabs(p); s++) {
		unsigned char vec[16];
		cr_assert_eq(mincore(kvrt_pool_addr(p, s), 64 << 10, vec), 0);
		for (long i = 0; i < (64 << 10) / pg; i++)
			cr_assert(vec[i] & 1, "slab %u page %ld not resident", s, i);
	}
	kvrt_pool_destroy(p);
}
