/* actors/pool.h: the CPU tier's memory, fixed-size chunk slabs.
 *
 * Owns: a few large mmap'd regions carved into slabs of slab_bytes (a chunk's
 * largest payload rounded up to 4 KiB), the free list, and a small ring of
 * free slabs handed to producers. No allocation per chunk.
 *
 * Regions are mmap'd with MAP_HUGETLB when the huge-page pool has room, else
 * plain pages with madvise(MADV_HUGEPAGE). With a pin hook (a CUDA device
 * present: the device layer passes cudaHostRegister/Unregister) each region
 * is pinned on its own: never one giant pin, and a region that fails to pin
 * fails the create (-ENOMEM/-EIO from the hook) rather than silently giving
 * pageable memory to a copy engine that expects pinned.
 *
 * A slab is named by its index (uint32_t); kvrt_pool_addr gives its address.
 *
 * Threads
 * - The owner (the evict actor): kvrt_pool_alloc, kvrt_pool_free,
 *   kvrt_pool_refill. The free list has no lock: only the owner touches it.
 * - Producers (the save actor, any number of threads): kvrt_pool_take pops a
 *   free slab from the hand-off ring (ck_ring SPMC: the owner is the single
 *   producer). An empty ring: take returns false at once; the save
 *   actor then asks the owner for room (actors/evict.h) and skips (and
 *   counts) its save when there is still none. Slabs taken and not used go back
 *   to the owner by message (the owner calls kvrt_pool_free).
 * - kvrt_pool_addr, kvrt_pool_slab_bytes, kvrt_pool_stats: any thread.
 * Create and destroy: any one thread, nothing else running.
 *
 * Ordering: the ring's enqueue (ck's store fence) publishes a slab index; the
 * slab's bytes are written only after take, and handed back in a message
 * (the mailbox orders them). TSan: release/acquire on the slab's address
 * around the ring.
 */
#ifndef KVRT_ACTORS_POOL_H
#define KVRT_ACTORS_POOL_H

#include "runtime/common.h"

struct kvrt_pool;

#define KVRT_POOL_NO_SLAB UINT32_MAX

/* Optional pinning of regions for DMA, supplied by the device layer. */
struct kvrt_pool_pin_ops {
	/* Pin [addr, addr+len): 0 or -errno. */
	int (*pin)(void *ctx, void *addr, size_t len);
	/* Unpin a region pinned by pin. */
	void (*unpin)(void *ctx, void *addr, size_t len);
	void *ctx; /* first argument of both */
};

struct kvrt_pool_config {
	uint64_t budget_bytes;  /* max_local_cpu_size: bytes of slabs, at most */
	uint64_t slab_bytes;    /* largest chunk payload; rounded up to 4 KiB */
	uint64_t region_bytes;  /* largest region; 0 = 1 GiB (rounded to whole slabs) */
	uint32_t ring_size;     /* hand-off ring slots, power of two; 0 = 64 */
	bool populate;          /* fault the pages in at create (MAP_POPULATE) */
	bool no_hugetlb;        /* skip the MAP_HUGETLB attempt */
	const struct kvrt_pool_pin_ops *pin; /* NULL: not pinned */
};

struct kvrt_pool_stats {
	uint64_t slab_bytes;   /* bytes per slab */
	uint32_t slabs;        /* slabs in all regions */
	uint32_t regions;      /* regions mapped */
	uint32_t free;         /* on the owner's free list */
	uint32_t ring;         /* waiting in the hand-off ring */
	uint32_t used;         /* neither: held by entries or producers */
	uint32_t hugetlb;      /* regions backed by MAP_HUGETLB */
	bool pinned;           /* regions pinned through the hook */
	uint64_t take_empty;   /* takes refused: ring empty (back-pressure) */
};

/* Map (and pin) the regions; every slab starts free. Any thread.
 * 0, -EINVAL (budget < one slab, slab_bytes 0, bad ring size), -ENOMEM,
 * or the pin hook's error. */
int kvrt_pool_create(struct kvrt_pool **out, const struct kvrt_pool_config *cfg);
/* Unpin and unmap. NULL ok. */
void kvrt_pool_destroy(struct kvrt_pool *p);

/* Owner: pop a free slab, or KVRT_POOL_NO_SLAB. */
uint32_t kvrt_pool_alloc(struct kvrt_pool *p);
/* Owner: return a slab to the free list. */
void kvrt_pool_free(struct kvrt_pool *p, uint32_t slab);
/* Owner: move free slabs into the hand-off ring until it is full or the
 * free list is down to keep_free slabs. Returns how many moved. */
uint32_t kvrt_pool_refill(struct kvrt_pool *p, uint32_t keep_free);
/* Owner: slabs on the free list now. */
uint32_t kvrt_pool_free_count(const struct kvrt_pool *p);
/* Owner: move every slab in the ring back to the free list (shutdown). */
uint32_t kvrt_pool_drain_ring(struct kvrt_pool *p);

/* Any thread: take a free slab from the ring. false: empty (back-pressure). */
bool kvrt_pool_take(struct kvrt_pool *p, uint32_t *slab);

/* Any thread. */
void *kvrt_pool_addr(const struct kvrt_pool *p, uint32_t slab);
uint64_t kvrt_pool_slab_bytes(const struct kvrt_pool *p);
uint32_t kvrt_pool_slabs(const struct kvrt_pool *p);
/* Snapshot (free/ring exact only on the owner's thread). */
void kvrt_pool_stats(const struct kvrt_pool *p, struct kvrt_pool_stats *out);

#endif
