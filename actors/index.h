/* actors/index.h: the chunk index, key -> chunk entry, and the pins on it.
 *
 * Owns: a ck_hs set of entries (one writer, lock-free readers on any
 * thread), the ck_epoch domain that frees removed entries once no reader can
 * still see them, and the owner table of pins.
 *
 * Threads
 * - Writer functions (kvrt_index_insert/find/try_retire/try_demote/promote,
 *   reclaim, gc, foreach): one thread at a time, in kvrt the evict actor.
 * - Reader functions (kvrt_index_lookup/get): any thread, each with its own
 *   struct kvrt_index_reader (kvrt_index_reader_open, one per thread).
 * - Pin functions (unpin, unpin_owner, unpin_expired, pinned): any thread.
 *
 * Entry life cycle. The writer allocates an entry, fills it and inserts it
 * (tier CPU or DISK). Readers find it inside an epoch section; a reader may
 * pin it under an owner id: a pinned entry is never retired and, while its
 * tier is CPU, never demoted, so its slab stays valid until the pin is
 * released. The writer retires an entry with one CAS on its state word that
 * succeeds only with zero pins and sets DEAD; after that no pin succeeds, the
 * entry is removed from the set and freed through ck_epoch once every reader
 * section that could have seen it has ended. So a pin either succeeds on a
 * live entry that then cannot be evicted, or fails (a miss). A detached
 * entry (kvrt_index_detach) is DEAD and out of the set while still pinned:
 * new pins fail at once, the pins held stay valid, and the writer frees it
 * when the last one is gone.
 *
 * State word (entry->state, one atomic u64):
 *     bits  0..31  pin count
 *     bits 32..39  tier (enum kvrt_tier)
 *     bit  63      DEAD: retired, pins fail
 *
 * Memory ordering
 * - Publication: the writer fills every field before ck_hs_put, whose store
 *   of the slot is ordered after them by ck_hs's own fence (ck_pr_fence_store
 *   in SPMC mode); a reader's dependent loads through the slot pointer see
 *   them. TSan does not see ck's fences: KVRT_TSAN_RELEASE(entry) before the
 *   put and KVRT_TSAN_ACQUIRE(entry) after the get stand in for them.
 * - Pins: the reader's CAS is acq_rel and the writer's retire/demote CAS is
 *   acq_rel: on the single state word they are totally ordered, so either the
 *   pin sees DEAD/DISK or the writer sees the pin.
 * - Unpin is a release fetch_sub: the pinner's reads of the slab happen
 *   before the writer's CAS (acquire) that then reuses the slab.
 * - Promotion: the writer stores the slab (relaxed) and then sets tier CPU
 *   with a release CAS; a reader that loads the state with acquire and sees
 *   CPU reads the new slab index.
 * - Reclamation: ck_epoch_begin/end (fences inside ck) order a reader's
 *   accesses before the writer's free; in TSan builds readers release, and
 *   the free callback acquires, one per-index sync address.
 * - atime/freq are hints written relaxed by readers; races only blur the
 *   eviction order, never correctness.
 */
#ifndef KVRT_ACTORS_INDEX_H
#define KVRT_ACTORS_INDEX_H

#include <ck_epoch.h>
#include <stdatomic.h>

#include "actors/chunk.h"

struct kvrt_index;
struct kvrt_index_reader;

#define KVRT_INDEX_PINS_MASK 0xffffffffull
#define KVRT_INDEX_TIER_SHIFT 32
#define KVRT_INDEX_TIER_MASK (0xffull << KVRT_INDEX_TIER_SHIFT)
#define KVRT_INDEX_DEAD (1ull << 63)

/* Writer-only flags of an entry (entry->flags). */
enum {
	KVRT_INDEX_F_WRITING = 1u << 0, /* being written to a lower tier (slab in use) */
	KVRT_INDEX_F_READING = 1u << 1, /* being read from a lower tier into a slab */
	KVRT_INDEX_F_GHOST = 1u << 2,   /* policy bookkeeping only (unused by index) */
};

struct kvrt_index_entry {
	struct kvrt_chunk_key key; /* immutable; first: the set compares it */
	_Atomic uint64_t state;    /* pins | tier | DEAD, see the header comment */
	_Atomic uint64_t atime;    /* last access stamp (LRU); readers store relaxed */
	_Atomic uint32_t freq;     /* accesses, saturating at 3 (S3-FIFO); readers */
	_Atomic uint32_t slab;     /* CPU tier: pool slab index (valid while tier CPU) */
	uint32_t num_tokens;       /* tokens in the chunk; immutable */
	uint32_t flags;            /* KVRT_INDEX_F_*; writer only */
	uint64_t bytes;            /* payload bytes; immutable */
	uint64_t checksum;         /* XXH3-64 of the payload as saved; immutable */
	/* Writer-only area for the eviction policy (actors/policy.h). */
	struct kvrt_index_entry *q_prev; /* queue links */
	struct kvrt_index_entry *q_next;
	uint64_t q_stamp;                /* atime the policy last saw */
	uint32_t q_pos;                  /* heap position, or UINT32_MAX */
	uint8_t q_id;                    /* which queue/structure holds it, 0 = none */
	uint8_t media;                   /* evict actor: where it last said the
					  * chunk is loadable from (KVRT_MEDIUM_*
					  * bits of actors/tier_events.h) */
	uint8_t q_pad[2];                /* unused */
	uint64_t owner_data;             /* free for the writer (e.g. a request cookie) */
	ck_epoch_entry_t epoch_entry;    /* deferred free */
};

static inline uint32_t kvrt_index_state_pins(uint64_t s)
{
	return (uint32_t)(s & KVRT_INDEX_PINS_MASK);
}

static inline enum kvrt_tier kvrt_index_state_tier(uint64_t s)
{
	return (enum kvrt_tier)((s & KVRT_INDEX_TIER_MASK) >> KVRT_INDEX_TIER_SHIFT);
}

/* Current tier (acquire). Any thread holding a pin or inside a section. */
static inline enum kvrt_tier kvrt_index_entry_tier(struct kvrt_index_entry *e)
{
	return kvrt_index_state_tier(atomic_load_explicit(&e->state, memory_order_acquire));
}

struct kvrt_index_config {
	uint64_t capacity; /* expected entries (the set is sized for it; it grows) */
};

/* Any thread. 0, -EINVAL, -ENOMEM. */
int kvrt_index_create(struct kvrt_index **out, const struct kvrt_index_config *cfg);
/* Frees every entry. No reader may be open, no call in flight. NULL ok. */
void kvrt_index_destroy(struct kvrt_index *idx);

/* --- readers ------------------------------------------------------------- */

/* A reader's epoch record. Open once per thread (any thread), use only on
 * that thread, close before the thread ends. NULL on -ENOMEM. */
struct kvrt_index_reader *kvrt_index_reader_open(struct kvrt_index *idx);
void kvrt_index_reader_close(struct kvrt_index_reader *r);

/* Lookup flags. */
enum {
	KVRT_INDEX_PIN = 1u << 0,   /* pin every chunk found, under owner */
	KVRT_INDEX_TOUCH = 1u << 1, /* record the access for the eviction policy */
};

/* One found chunk. */
struct kvrt_index_hit {
	struct kvrt_index_entry *entry; /* valid while pinned (PIN) */
	enum kvrt_tier tier;            /* tier when found */
	uint32_t slab;                  /* CPU tier: slab index when found */
};

/* Walk keys[0..n) in order and stop at the first one missing (or dead).
 * Returns how many leading chunks were found; hits[i] (when hits != NULL)
 * describes each. With KVRT_INDEX_PIN each found chunk is pinned under
 * owner (release with kvrt_index_unpin*); when the owner table cannot grow
 * (-ENOMEM) nothing stays pinned and 0 is returned. With KVRT_INDEX_TOUCH
 * the chunks are stamped so that chunk 0 is the most recent of them: the
 * policy evicts a prefix's later chunks before its earlier ones.
 * Lock-free; no allocation unless pinning for a new owner. Reader's thread. */
size_t kvrt_index_lookup(struct kvrt_index_reader *r, const struct kvrt_chunk_key *keys, size_t n,
			 uint64_t owner, unsigned flags, struct kvrt_index_hit *hits);

/* --- pins (any thread) -------------------------------------------------- */

/* Release one pin of owner on key. 0, or -ENOENT (owner holds none). */
int kvrt_index_unpin(struct kvrt_index *idx, uint64_t owner, struct kvrt_chunk_key key);
/* Release every pin of owner (finished, aborted, preempted). Returns how many. */
size_t kvrt_index_unpin_owner(struct kvrt_index *idx, uint64_t owner);
/* Release every pin of owners whose first pin is older than before_ns
 * (kvrt_now_ns clock): the time-out path. Returns how many pins. */
size_t kvrt_index_unpin_expired(struct kvrt_index *idx, uint64_t before_ns);
/* Pins held now, all owners (relaxed snapshot). */
uint64_t kvrt_index_pinned(const struct kvrt_index *idx);
/* Owners holding pins now. */
uint64_t kvrt_index_owners(struct kvrt_index *idx);

/* --- writer (one thread) ------------------------------------------------ */

/* A zeroed entry for key (tier NONE, q_pos UINT32_MAX); NULL on -ENOMEM.
 * Fill it, then kvrt_index_insert it, or kvrt_index_entry_free it. */
struct kvrt_index_entry *kvrt_index_entry_new(struct kvrt_index *idx, struct kvrt_chunk_key key,
					      enum kvrt_tier tier);
void kvrt_index_entry_free(struct kvrt_index *idx, struct kvrt_index_entry *e);

/* Publish e. 0, -EEXIST (key present: e not inserted), -ENOMEM. */
int kvrt_index_insert(struct kvrt_index *idx, struct kvrt_index_entry *e);
/* The live entry for key, or NULL. Writer thread; no section needed. */
struct kvrt_index_entry *kvrt_index_find(struct kvrt_index *idx, struct kvrt_chunk_key key);
/* Retire e if unpinned: mark DEAD, remove it, free it after the grace
 * period (e must not be used by the caller afterwards). false: pinned. */
bool kvrt_index_try_retire(struct kvrt_index *idx, struct kvrt_index_entry *e);
/* Take e out of the set now, pinned or not: from here on lookups miss it
 * (pins fail: DEAD) and a new entry for its key may be inserted, while the
 * pins already held stay valid (the caller keeps e's slab until they are
 * gone). Then kvrt_index_try_release_detached frees it. For an entry that
 * must not be served again (a copy found corrupt). */
void kvrt_index_detach(struct kvrt_index *idx, struct kvrt_index_entry *e);
/* Free detached e once its last pin is gone (after the grace period, as a
 * retired entry). false: still pinned, nothing changed. */
bool kvrt_index_try_release_detached(struct kvrt_index *idx, struct kvrt_index_entry *e);
/* CPU -> to (DISK or REMOTE) if unpinned; the slab then belongs to the
 * caller again. false: pinned (or not CPU). */
bool kvrt_index_try_demote(struct kvrt_index_entry *e, enum kvrt_tier to);
/* Lower tier -> CPU in slab; pins are kept. */
void kvrt_index_promote(struct kvrt_index_entry *e, uint32_t slab);
/* Free what the grace period allows (call now and then). */
void kvrt_index_reclaim(struct kvrt_index *idx);
/* Wait for every reader section in progress to end, then free all retired. */
void kvrt_index_barrier(struct kvrt_index *idx);
/* Compact the set's probe sequences after many removals (ck_hs_gc); lock-
 * free for readers. O(capacity): call when removals since the last call
 * exceed the entry count. */
void kvrt_index_gc(struct kvrt_index *idx);
/* Entries in the set. */
uint64_t kvrt_index_count(struct kvrt_index *idx);
/* Entries retired but not freed yet. */
uint64_t kvrt_index_pending_frees(struct kvrt_index *idx);
/* Call fn on every live entry (writer thread). fn may not modify the set. */
void kvrt_index_foreach(struct kvrt_index *idx, void (*fn)(struct kvrt_index_entry *e, void *arg),
			void *arg);

#endif
