/* actors/lookup.c: the lookup actor.
 *
 * Owns: its index reader, a scratch key buffer, and the prefetches it
 * started (promotions of disk-only chunks whose completions it must keep
 * alive until the evict actor signals them).
 *
 * A lookup is a request/reply on the actor's mailbox: the caller (vLLM's
 * scheduler thread) waits for the answer; its token array stays valid for
 * the call. The actor hashes the prompt into chunk keys (actors/key.h),
 * replaces the request's pins with pins on every chunk found, and promotes
 * the ones found on disk so that an async load finds them in the CPU tier.
 *
 * Remote tier: chunks another engine wrote to Redis are not in the local
 * index. On a local miss at chunk i (with remote_url set) the actor asks
 * the evict actor to EXISTS keys i.. in Redis (one pipelined round trip) and
 * does not wait: the lookup answers -EINPROGRESS ("ask again": vLLM's
 * scheduler skips the request this pass and asks on the next one; it never
 * blocks on Redis). The request's next lookup takes the answer: the chunks
 * Redis holds were indexed as tier REMOTE by then; they are pinned like any
 * hit, reported as loadable after prefetch (tokens, not tokens_now) and
 * promoted like disk chunks (a read into a fresh slab). Until the answer
 * comes, lookups keep answering -EINPROGRESS, for remote_lookup_wait_ms at
 * most (5 ms by default, never more than remote_timeout_ms) from the
 * ask; after that the request gets its local answer. An answer is reused by
 * the request's later lookups for a second (vLLM asks about a waiting
 * request every pass) rather than asking Redis again; but a short answer
 * (Redis lacked later chunks) that a lookup already took is asked again
 * 50 ms on, if the request is still looked up (a P/D consumer waiting for
 * its producer's writes to land). An answer that comes
 * late still indexes the chunks for later lookups. A dead server answers
 * at once (-ENOTCONN): a miss. (kvrt <= 0.1 waited in the lookup
 * itself: a scheduler admitting 64 new requests could block 64 round
 * trips.)
 *
 * Threads: the handler and the timer run on the actor's thread; create,
 * destroy and free on the engine's owner thread; _kvrt_lookup_call on any
 * thread but the actor's.
 */
#include <errno.h>
#include <ev.h>
#include <stdlib.h>
#include <string.h>

#include "actors/pipeline.h"
#include "actors/remote.h"
#include "runtime/actor.h"
#include "runtime/log.h"

enum { _LOOKUP = 1 };

/* Promotions started by one lookup. */
struct _prefetch {
	struct _prefetch *next;        /* list */
	uint32_t n;                    /* completions */
	struct kvrt_completion c[];    /* one per promoted chunk */
};

/* An ask of Redis about a request's chunks from `first` on. Kept after
 * its answer (for _RP_TTL_NS): vLLM asks about a waiting request on every
 * scheduler pass, and those lookups reuse it instead of asking Redis
 * again. Orphaned (no longer answered from, freed once its completion is
 * signalled: the evict actor writes it) when its request asks about other
 * chunks or its time to live ran out. */
struct _rpend {
	struct _rpend *next;            /* list */
	uint64_t req;                   /* pin owner */
	struct kvrt_chunk_key first;    /* the first chunk missing locally */
	uint32_t at;                    /* its index in the prompt */
	uint32_t n;                     /* keys asked */
	uint64_t t0;                    /* when asked */
	uint64_t t_end;                 /* when seen answered or given up on (0: not yet) */
	uint64_t t_used;                /* when a lookup first took a short answer (0: not yet) */
	bool gave_up;                   /* answered locally: it came too late */
	bool orphan;                    /* freed once c is signalled */
	struct kvrt_completion c;       /* value[0]: leading keys Redis holds */
};

#define _RP_TTL_NS 1000000000ull /* an answer is reused this long after it came */
/* A short answer (Redis lacked the prompt's later chunks) that a lookup
 * already took is asked again when the request is still looked up this
 * long after: a scheduler waiting for another instance's writes (a P/D
 * consumer) sees them land. */
#define _RP_REASK_NS 50000000ull
#define _RP_MAX 4096u            /* asks kept; beyond: local answers */

struct kvrt_lookup {
	struct kvrt_engine *e;          /* the engine */
	struct kvrt_actor *actor;       /* the actor */
	struct kvrt_index_reader *r;    /* opened on the actor's thread */
	struct kvrt_chunk_key *keys;    /* scratch */
	struct kvrt_index_hit *hits;    /* scratch */
	size_t cap;                     /* entries in keys and hits */
	struct _prefetch *pf;           /* prefetches in flight */
	struct _rpend *rp;              /* Redis asks (in flight or answered) */
	uint32_t nrp;                   /* entries in rp */
	ev_timer tick;                  /* reaps finished prefetches (1 ms) */
	ev_timer ask_tick;              /* reaps asks (100 ms) */
};

/* A call's arguments and answer (on the caller's stack). */
struct _lookup_args {
	uint64_t req;                   /* pin owner */
	uint64_t ns;                    /* key namespace */
	const uint32_t *tokens;         /* [n] */
	uint32_t n;
	struct kvrt_lookup_result *out; /* answer */
};

/* Free prefetches whose every promotion has been answered. */
static void reap(struct kvrt_lookup *l, bool all)
{
	struct _prefetch **pp = &l->pf;
	while (*pp) {
		struct _prefetch *p = *pp;
		bool done = true;
		for (uint32_t i = 0; i < p->n && done; i++)
			done = kvrt_completion_done(&p->c[i]);
		if (done || all) {
			*pp = p->next;
			free(p);
		} else {
			pp = &p->next;
		}
	}
}

/* Orphan asks past their time to live and free orphans whose answer
 * came (all: at stop, the evict actor is gone). */
static void reap_asks(struct kvrt_lookup *l, bool all)
{
	uint64_t now = kvrt_now_ns();
	struct _rpend **pp = &l->rp;
	while (*pp) {
		struct _rpend *r = *pp;
		/* Kept _RP_TTL_NS from its answer (or from giving up on it): an
		 * ask still waiting within remote_lookup_wait_ms stays. */
		if (!r->t_end && (r->gave_up || kvrt_completion_done(&r->c)))
			r->t_end = now;
		if (r->t_end && now - r->t_end >= _RP_TTL_NS)
			r->orphan = true;
		if (all || (r->orphan && kvrt_completion_done(&r->c))) {
			*pp = r->next;
			l->nrp--;
			free(r);
		} else {
			pp = &r->next;
		}
	}
}

static void tick_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	(void)revents;
	struct kvrt_lookup *l = w->data;
	reap(l, false);
	if (!l->pf)
		ev_timer_stop(loop, w);
}

/* Asks live about a second: a slower tick than the prefetches'. */
static void ask_tick_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	(void)revents;
	struct kvrt_lookup *l = w->data;
	reap_asks(l, false);
	if (!l->rp)
		ev_timer_stop(loop, w);
}

static int ensure(struct kvrt_lookup *l, size_t n)
{
	if (n <= l->cap)
		return 0;
	size_t cap = l->cap ? l->cap : 256;
	while (cap < n)
		cap *= 2;
	struct kvrt_chunk_key *k = realloc(l->keys, cap * sizeof(*k));
	if (!k)
		return -ENOMEM;
	l->keys = k;
	struct kvrt_index_hit *h = realloc(l->hits, cap * sizeof(*h));
	if (!h)
		return -ENOMEM;
	l->hits = h;
	l->cap = cap;
	return 0;
}

static void tick_on(struct kvrt_lookup *l)
{
	if (!ev_is_active(&l->tick))
		ev_timer_start(kvrt_actor_loop(l->actor), &l->tick);
}

static void track(struct kvrt_lookup *l, struct _prefetch *p)
{
	p->next = l->pf;
	l->pf = p;
	tick_on(l);
}

/* Chunks [found, total) are not indexed. No ask of this request about
 * chunk `found`: ask Redis, -EINPROGRESS. An ask not answered yet:
 * -EINPROGRESS for remote_lookup_wait_ms from the ask, then 0 chunks (the
 * local answer; later lookups too, without asking again). An answered ask:
 * index and pin what Redis holds; *more = the chunks found after `found`. */
static int remote_find(struct kvrt_lookup *l, struct _lookup_args *a, size_t found, uint32_t total,
		       uint32_t tail, size_t *more)
{
	struct kvrt_engine *e = l->e;
	*more = 0;
	struct _rpend *r = l->rp;
	while (r && (r->orphan || r->req != a->req))
		r = r->next;
	/* The same prompt (chained keys: the same chunk at the same place
	 * means the same tokens before it), and either the same local miss or,
	 * answered, exactly where Redis's run ended (the chunks it held are
	 * indexed now): the ask stands. Otherwise the request asks about other
	 * chunks. */
	if (r) {
		bool same = r->at < total && kvrt_chunk_key_eq(r->first, l->keys[r->at]);
		bool done = kvrt_completion_done(&r->c);
		uint64_t held = done && !r->c.status ? r->c.value[0] : 0;
		if (same && done && held < r->n && found == r->at + held) {
			/* Redis's answer ended here. Taken long enough ago: ask
			 * again (the chunks may have landed since). */
			uint64_t now = kvrt_now_ns();
			if (!r->t_used) {
				r->t_used = now;
			} else if (now - r->t_used >= _RP_REASK_NS) {
				r->orphan = true;
				r = NULL;
				same = false;
			}
		}
		if (r && same && done && found == r->at + (held < r->n ? held : r->n) && found > r->at)
			return 0; /* Redis's answer ended here: nothing more */
		if (r && (!same || found != r->at)) {
			r->orphan = true;
			r = NULL;
		}
	}
	if (!r) {
		if (l->nrp >= _RP_MAX)
			return 0;
		uint32_t n = total - (uint32_t)found;
		if (n > KVRT_REMOTE_EXISTS_MAX)
			n = KVRT_REMOTE_EXISTS_MAX;
		bool has_tail = tail && found + n == total;
		/* On the heap: the evict actor writes c whenever Redis answers. */
		if (!(r = calloc(1, sizeof(*r))))
			return 0;
		*r = (struct _rpend){.req = a->req, .first = l->keys[found], .at = (uint32_t)found, .n = n,
				     .t0 = kvrt_now_ns()};
		kvrt_completion_init(&r->c);
		if (kvrt_evict_remote_find(e->ev, l->keys + found, n, e->cs, has_tail ? tail : 0, &r->c)) {
			free(r);
			return 0; /* cannot ask: the local answer */
		}
		r->next = l->rp;
		l->rp = r;
		l->nrp++;
		if (!ev_is_active(&l->ask_tick))
			ev_timer_start(kvrt_actor_loop(l->actor), &l->ask_tick);
		_KVRT_STAT_ADD(e, st_remote_finds, 1);
		return -EINPROGRESS;
	}
	if (!kvrt_completion_done(&r->c)) {
		uint64_t now = kvrt_now_ns();
		if (!r->gave_up && now - r->t0 < e->remote_wait_ns)
			return -EINPROGRESS;
		if (!r->gave_up) {
			_KVRT_STAT_ADD(e, st_remote_find_late, 1);
			r->gave_up = true;
			r->t_end = now;
		}
		return 0;
	}
	if (!r->t_end)
		r->t_end = kvrt_now_ns();
	if (r->c.status || !r->c.value[0])
		return 0;
	uint32_t k = (uint32_t)r->c.value[0];
	if (k > r->n)
		k = r->n;
	*more = kvrt_index_lookup(l->r, l->keys + found, k, a->req, KVRT_INDEX_PIN | KVRT_INDEX_TOUCH,
				  l->hits + found);
	return 0;
}

static int do_lookup(struct kvrt_lookup *l, struct _lookup_args *a)
{
	struct kvrt_engine *e = l->e;
	uint32_t cs = e->cs;
	uint32_t nfull = a->n / cs, tail = a->n % cs;
	int rc = ensure(l, (size_t)nfull + 1);
	if (rc)
		return rc;
	_kvrt_keys(a->ns, a->tokens, cs, nfull, tail, l->keys);
	/* Idempotent: the request's earlier pins are replaced by this answer. */
	kvrt_index_unpin_owner(e->idx, a->req);
	unsigned fl = KVRT_INDEX_PIN | KVRT_INDEX_TOUCH;
	size_t found = kvrt_index_lookup(l->r, l->keys, nfull, a->req, fl, l->hits);
	uint32_t tokens = (uint32_t)found * cs;
	if (found == nfull && tail && kvrt_index_lookup(l->r, l->keys + nfull, 1, a->req, fl, l->hits + nfull)) {
		found++;
		tokens += tail;
	}
	uint32_t total = nfull + (tail != 0);
	if (found < total && e->remote_wait_ns) {
		size_t more;
		if ((rc = remote_find(l, a, found, total, tail, &more)))
			return rc; /* -EINPROGRESS: the local pins stay until the answer */
		found += more;
		tokens = (uint32_t)(found > nfull ? nfull * cs + tail : found * cs);
	}
	uint32_t now = 0, nprefetch = 0;
	while (now < found && l->hits[now].tier == KVRT_TIER_CPU)
		now++;
	for (size_t i = now; i < found; i++)
		nprefetch += l->hits[i].tier != KVRT_TIER_CPU;
	struct kvrt_lookup_result *o = a->out;
	o->chunks = (uint32_t)found;
	o->tokens = tokens;
	o->chunks_now = now;
	o->tokens_now = now == found ? tokens : now * cs;
	if (nprefetch) {
		struct _prefetch *p = malloc(sizeof(*p) + nprefetch * sizeof(p->c[0]));
		if (p) {
			p->n = 0;
			for (size_t i = now; i < found; i++) {
				if (l->hits[i].tier == KVRT_TIER_CPU)
					continue;
				kvrt_completion_init(&p->c[p->n]);
				if (kvrt_evict_promote(e->ev, l->keys[i], &p->c[p->n]) == 0)
					p->n++;
			}
			_KVRT_STAT_ADD(e, st_prefetches, p->n);
			track(l, p);
		}
	}
	_KVRT_STAT_ADD(e, st_lookups, 1);
	_KVRT_STAT_ADD(e, st_lookup_tokens, tokens);
	return 0;
}

static void handle(struct kvrt_actor *a, struct kvrt_msg *m)
{
	struct kvrt_lookup *l = kvrt_actor_data(a);
	int rc = -EINVAL;
	if (m->type == _LOOKUP)
		rc = do_lookup(l, m->arg.ptr[0]);
	if (m->reply)
		kvrt_completion_signal(m->reply, rc);
}

static int start(struct kvrt_actor *a)
{
	struct kvrt_lookup *l = kvrt_actor_data(a);
	l->r = kvrt_index_reader_open(l->e->idx);
	if (!l->r)
		return -ENOMEM;
	ev_timer_init(&l->tick, tick_cb, 0.001, 0.001);
	l->tick.data = l;
	ev_timer_init(&l->ask_tick, ask_tick_cb, 0.1, 0.1);
	l->ask_tick.data = l;
	return 0;
}

static void stop(struct kvrt_actor *a)
{
	struct kvrt_lookup *l = kvrt_actor_data(a);
	ev_timer_stop(kvrt_actor_loop(a), &l->tick);
	ev_timer_stop(kvrt_actor_loop(a), &l->ask_tick);
	kvrt_index_reader_close(l->r);
	l->r = NULL;
}

static const char *msg_name(uint32_t type)
{
	return type == _LOOKUP ? "lookup" : "?";
}

static const struct kvrt_actor_ops lookup_ops = {
	.handle = handle, .start = start, .stop = stop, .msg_name = msg_name};

int _kvrt_lookup_create(struct kvrt_engine *e, struct kvrt_lookup **out)
{
	struct kvrt_lookup *l = calloc(1, sizeof(*l));
	if (!l)
		return -ENOMEM;
	l->e = e;
	int rc = kvrt_actor_create(&l->actor, &(struct kvrt_actor_config){
						      .name = "lookup", .mailbox_size = e->cfg.mailbox_size ? e->cfg.mailbox_size : 1024, .ops = &lookup_ops, .data = l});
	if (rc) {
		free(l);
		return rc;
	}
	*out = l;
	return 0;
}

void _kvrt_lookup_destroy(struct kvrt_lookup *l)
{
	if (l)
		kvrt_actor_destroy(l->actor);
}

void _kvrt_lookup_free(struct kvrt_lookup *l)
{
	if (!l)
		return;
	/* The evict actor is gone: it answered every promotion (stop signals
	 * the ones still waiting), so nothing refers to the completions. */
	reap(l, true);
	reap_asks(l, true);
	free(l->keys);
	free(l->hits);
	free(l);
}

int _kvrt_lookup_call(struct kvrt_lookup *l, uint64_t req, uint64_t ns, const uint32_t *tokens,
		      uint32_t n, struct kvrt_lookup_result *out)
{
	struct _lookup_args args = {.req = req, .ns = ns, .tokens = tokens, .n = n, .out = out};
	struct kvrt_msg m = {.type = _LOOKUP};
	m.arg.ptr[0] = &args;
	struct kvrt_completion c;
	kvrt_completion_init(&c);
	/* A full mailbox answers "no hit" rather than stall the scheduler. */
	int rc = kvrt_actor_call(l->actor, &m, &c, 1000000);
	if (rc == -ETIMEDOUT)
		rc = -EAGAIN;
	if (rc)
		memset(out, 0, sizeof(*out));
	return rc;
}
