/* actors/policy.h: the CPU tier's eviction order.
 *
 * Owns: the order of the CPU-resident entries (it links them through their
 * writer-only q_* fields, actors/index.h) and, for S3-FIFO, the ghost queue
 * of recently evicted keys. Used only by the evict actor's thread.
 *
 * Readers record accesses on entries themselves (atime, freq: see
 * kvrt_index_lookup with KVRT_INDEX_TOUCH); the policy reads them lazily when
 * it looks for a victim, so a lookup never sends a message.
 *
 * LRU (default): a binary min-heap on the access stamp. A victim candidate
 * whose stamp moved since it was placed is re-placed (sifted down) and the
 * search goes on, so the order is exact LRU by stamps. A lookup stamps a
 * prefix so that chunk 0 is the most recent: its later chunks go first.
 *
 * S3-FIFO (scan-resistant): new entries enter a small FIFO (10% of the
 * capacity); an entry leaving it that was accessed since it came moves to
 * the main FIFO, else it is evicted and its key remembered in a ghost FIFO
 * (as many keys as the capacity). An entry whose key is in the ghost enters
 * main directly. Leaving main, an accessed entry is re-inserted with its
 * count decremented (up to 3 rounds). A one-time scan passes through the
 * small queue without displacing the re-used working set in main.
 */
#ifndef KVRT_ACTORS_POLICY_H
#define KVRT_ACTORS_POLICY_H

#include "actors/index.h"

enum kvrt_policy_kind {
	KVRT_POLICY_LRU = 0,
	KVRT_POLICY_S3FIFO = 1,
};

struct kvrt_policy;

/* Parse a cache_policy value ("LRU", "S3FIFO"/"S3-FIFO", case-insensitive).
 * 0 or -EINVAL. */
int kvrt_policy_parse(const char *name, enum kvrt_policy_kind *out);
const char *kvrt_policy_name(enum kvrt_policy_kind k);

/* capacity: most entries held at once (the pool's slab count). */
int kvrt_policy_create(struct kvrt_policy **out, enum kvrt_policy_kind kind, uint32_t capacity);
void kvrt_policy_destroy(struct kvrt_policy *p);

/* e became CPU-resident (admitted or promoted). */
void kvrt_policy_insert(struct kvrt_policy *p, struct kvrt_index_entry *e);
/* e leaves the CPU tier other than through kvrt_policy_victim. */
void kvrt_policy_remove(struct kvrt_policy *p, struct kvrt_index_entry *e);
/* Take the next victim out of the order (NULL: empty). The caller evicts it,
 * or, when it cannot (pinned, in flight), gives it back with
 * kvrt_policy_putback after its pass. */
struct kvrt_index_entry *kvrt_policy_victim(struct kvrt_policy *p);
/* Return a victim that could not be evicted; it keeps its place as near the
 * eviction end as the policy allows. */
void kvrt_policy_putback(struct kvrt_policy *p, struct kvrt_index_entry *e);
/* Entries held. */
uint32_t kvrt_policy_count(const struct kvrt_policy *p);

#endif
