/* actors/pool.c: see pool.h. */
#include "actors/pool.h"

#include <ck_ring.h>
#include <errno.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "runtime/log.h"

#define PAGE 4096ull
#define HUGE_PAGE (2ull << 20)

/* Where a slab is, for the owner's double-free check. */
enum { SLAB_USED = 0, SLAB_FREE = 1, SLAB_RING = 2 };

struct _region {
	void *base;      /* mapping start */
	size_t map_len;  /* mapped bytes (multiple of the page size used) */
	bool hugetlb;    /* MAP_HUGETLB mapping */
	bool pinned;     /* pinned through the hook */
};

struct kvrt_pool {
	ck_ring_t ring;              /* hand-off ring: owner enqueues, producers dequeue */
	ck_ring_buffer_t *ring_buf;  /* its slots */
	uint64_t slab_bytes;         /* bytes per slab, multiple of 4 KiB */
	uint32_t slabs;              /* total slabs */
	uint32_t per_region;         /* slabs per region (the last may hold fewer) */
	uint32_t nregions;           /* regions */
	struct _region *regions;     /* nregions entries */
	uint32_t *free_list;         /* owner's stack of free slabs */
	_Atomic uint32_t free_n;     /* its depth (atomic only for stats) */
	uint8_t *where;              /* owner's SLAB_* per slab */
	_Atomic uint64_t take_empty; /* takes that found the ring empty */
	struct kvrt_pool_pin_ops pin; /* copy of the hook; pin.pin NULL = none */
};

static void region_unmap(struct kvrt_pool *p, struct _region *r)
{
	if (!r->base)
		return;
	if (r->pinned && p->pin.unpin)
		p->pin.unpin(p->pin.ctx, r->base, r->map_len);
	munmap(r->base, r->map_len);
	r->base = NULL;
}

static int region_map(struct kvrt_pool *p, struct _region *r, size_t len, const struct kvrt_pool_config *cfg)
{
	int pop = cfg->populate ? MAP_POPULATE : 0;
	void *m = MAP_FAILED;
	if (!cfg->no_hugetlb) {
		size_t hl = (len + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1);
		m = mmap(NULL, hl, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB | pop, -1, 0);
		if (m != MAP_FAILED) {
			r->map_len = hl;
			r->hugetlb = true;
		}
	}
	if (m == MAP_FAILED) {
		m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | pop, -1, 0);
		if (m == MAP_FAILED)
			return -ENOMEM;
		r->map_len = len;
		r->hugetlb = false;
		/* Transparent huge pages where the kernel allows; a refusal
		 * only costs TLB misses. */
		(void)madvise(m, len, MADV_HUGEPAGE);
	}
	r->base = m;
	if (p->pin.pin) {
		int rc = p->pin.pin(p->pin.ctx, r->base, r->map_len);
		if (rc) {
			kvrt_error("pool: pinning a region of %zu bytes failed (%d)", r->map_len, rc);
			munmap(r->base, r->map_len);
			r->base = NULL;
			return rc < 0 ? rc : -EIO;
		}
		r->pinned = true;
	}
	return 0;
}

int kvrt_pool_create(struct kvrt_pool **out, const struct kvrt_pool_config *cfg)
{
	*out = NULL;
	if (!cfg || !cfg->slab_bytes)
		return -EINVAL;
	uint32_t ring_size = cfg->ring_size ? cfg->ring_size : 64;
	if (ring_size < 4 || (ring_size & (ring_size - 1)))
		return -EINVAL;
	uint64_t slab = (cfg->slab_bytes + PAGE - 1) & ~(PAGE - 1);
	uint64_t nslabs = cfg->budget_bytes / slab;
	if (nslabs == 0 || nslabs >= UINT32_MAX) {
		kvrt_error("pool: a budget of %llu bytes holds %llu slabs of %llu bytes (need 1 .. 2^32-2)",
			   (unsigned long long)cfg->budget_bytes, (unsigned long long)nslabs,
			   (unsigned long long)slab);
		return -EINVAL;
	}
	uint64_t region = cfg->region_bytes ? cfg->region_bytes : (1ull << 30);
	uint64_t per = region / slab;
	if (per == 0)
		per = 1;
	if (per > nslabs)
		per = nslabs;

	int rc = -ENOMEM;
	struct kvrt_pool *p = calloc(1, sizeof(*p));
	if (!p)
		return -ENOMEM;
	p->slab_bytes = slab;
	p->slabs = (uint32_t)nslabs;
	p->per_region = (uint32_t)per;
	p->nregions = (uint32_t)((nslabs + per - 1) / per);
	if (cfg->pin)
		p->pin = *cfg->pin;
	p->regions = calloc(p->nregions, sizeof(*p->regions));
	p->free_list = malloc(sizeof(uint32_t) * p->slabs);
	p->where = malloc(p->slabs);
	p->ring_buf = calloc(ring_size, sizeof(*p->ring_buf));
	if (!p->regions || !p->free_list || !p->where || !p->ring_buf)
		goto err;
	ck_ring_init(&p->ring, ring_size);
	for (uint32_t i = 0; i < p->nregions; i++) {
		uint64_t n = i + 1 < p->nregions ? per : nslabs - (uint64_t)i * per;
		rc = region_map(p, &p->regions[i], (size_t)(n * slab), cfg);
		if (rc)
			goto err;
	}
	/* Lowest slab on top of the stack: fills regions in order. */
	for (uint32_t i = 0; i < p->slabs; i++) {
		p->free_list[i] = p->slabs - 1 - i;
		p->where[i] = SLAB_FREE;
	}
	atomic_init(&p->free_n, p->slabs);
	atomic_init(&p->take_empty, 0);
	*out = p;
	return 0;
err:
	kvrt_pool_destroy(p);
	return rc;
}

void kvrt_pool_destroy(struct kvrt_pool *p)
{
	if (!p)
		return;
	if (p->regions)
		for (uint32_t i = 0; i < p->nregions; i++)
			region_unmap(p, &p->regions[i]);
	free(p->regions);
	free(p->free_list);
	free(p->where);
	free(p->ring_buf);
	free(p);
}

uint32_t kvrt_pool_alloc(struct kvrt_pool *p)
{
	uint32_t n = atomic_load_explicit(&p->free_n, memory_order_relaxed);
	if (!n)
		return KVRT_POOL_NO_SLAB;
	uint32_t s = p->free_list[--n];
	atomic_store_explicit(&p->free_n, n, memory_order_relaxed);
	KVRT_ASSERT(p->where[s] == SLAB_FREE);
	p->where[s] = SLAB_USED;
	return s;
}

void kvrt_pool_free(struct kvrt_pool *p, uint32_t slab)
{
	KVRT_ASSERT(slab < p->slabs);
	/* RING here means a producer took it and gave it back unused. */
	KVRT_ASSERT(p->where[slab] != SLAB_FREE);
	p->where[slab] = SLAB_FREE;
	uint32_t n = atomic_load_explicit(&p->free_n, memory_order_relaxed);
	p->free_list[n] = slab;
	atomic_store_explicit(&p->free_n, n + 1, memory_order_relaxed);
}

uint32_t kvrt_pool_free_count(const struct kvrt_pool *p)
{
	return atomic_load_explicit(&p->free_n, memory_order_relaxed);
}

uint32_t kvrt_pool_refill(struct kvrt_pool *p, uint32_t keep_free)
{
	uint32_t moved = 0;
	uint32_t n = atomic_load_explicit(&p->free_n, memory_order_relaxed);
	while (n > keep_free) {
		uint32_t s = p->free_list[n - 1];
		/* TSan stand-in for the ring's store fence (see pool.h). */
		KVRT_TSAN_RELEASE(kvrt_pool_addr(p, s));
		if (!ck_ring_enqueue_spmc(&p->ring, p->ring_buf, (void *)(uintptr_t)s))
			break;
		p->where[s] = SLAB_RING;
		n--;
		moved++;
	}
	atomic_store_explicit(&p->free_n, n, memory_order_relaxed);
	return moved;
}

uint32_t kvrt_pool_drain_ring(struct kvrt_pool *p)
{
	uint32_t n = 0;
	void *v;
	while (ck_ring_dequeue_spmc(&p->ring, p->ring_buf, &v)) {
		kvrt_pool_free(p, (uint32_t)(uintptr_t)v);
		n++;
	}
	return n;
}

bool kvrt_pool_take(struct kvrt_pool *p, uint32_t *slab)
{
	void *v;
	if (!ck_ring_dequeue_spmc(&p->ring, p->ring_buf, &v)) {
		atomic_fetch_add_explicit(&p->take_empty, 1, memory_order_relaxed);
		return false;
	}
	*slab = (uint32_t)(uintptr_t)v;
	KVRT_TSAN_ACQUIRE(kvrt_pool_addr(p, *slab));
	return true;
}

void *kvrt_pool_addr(const struct kvrt_pool *p, uint32_t slab)
{
	uint32_t r = slab / p->per_region;
	return (char *)p->regions[r].base + (uint64_t)(slab - r * p->per_region) * p->slab_bytes;
}

uint64_t kvrt_pool_slab_bytes(const struct kvrt_pool *p)
{
	return p->slab_bytes;
}

uint32_t kvrt_pool_slabs(const struct kvrt_pool *p)
{
	return p->slabs;
}

void kvrt_pool_stats(const struct kvrt_pool *p, struct kvrt_pool_stats *out)
{
	memset(out, 0, sizeof(*out));
	out->slab_bytes = p->slab_bytes;
	out->slabs = p->slabs;
	out->regions = p->nregions;
	out->free = atomic_load_explicit(&p->free_n, memory_order_relaxed);
	out->ring = ck_ring_size(&p->ring);
	uint32_t held = out->free + out->ring;
	out->used = held > p->slabs ? 0 : p->slabs - held;
	for (uint32_t i = 0; i < p->nregions; i++)
		out->hugetlb += p->regions[i].hugetlb;
	out->pinned = p->pin.pin != NULL;
	out->take_empty = atomic_load_explicit(&p->take_empty, memory_order_relaxed);
}
