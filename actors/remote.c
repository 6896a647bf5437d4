/* actors/remote.c: the remote tier on Redis / Redis Cluster; see remote.h for
 * the contract, the key and value formats, and the fault model. The URL is
 * parsed by redis_url.c, keys are named and slotted by redis_key.c, the
 * cluster's redirects and slot table replies by redis_cluster.c;
 * completions go out through an outbox (runtime/outbox.h). This file is
 * the "remote" actor: nodes, the wire, cluster topology and routing.
 *
 * Structure
 * - Callers allocate a request (struct _req) and post its pointer to the
 *   "remote" actor; from then on the actor owns it until its completion is
 *   posted to cfg->notify.
 * - The actor routes each request to a node (struct _node: one server, one
 *   hiredis async context at a time) and sends it: kvrt frames the RESP
 *   command itself (small parts in the request, the payload by reference),
 *   registers the reply callback with hiredis through
 *   redisAsyncFormattedCommand, then takes the bytes back out of hiredis'
 *   output buffer into the node's own segment queue, which a kvrt ev_io
 *   writes with sendmsg. Bytes on the wire thus follow callback order.
 * - Replies: a kvrt ev_io reads into hiredis' reader buffer (up to 1 MiB a
 *   read), then redisProcessCallbacks. A reader hook verifies a GET's bulk
 *   string and copies it to dst without building a reply object.
 * - Each node keeps its requests in flight in a FIFO that mirrors hiredis'
 *   callback list, so the hook knows which request a reply belongs to and the
 *   deadline timer knows what is late.
 * - A node is DOWN (waiting to reconnect), CONNECTING (context made; hand-
 *   shake queued) or UP. Dropping a node frees its context: hiredis then calls
 *   every pending callback with a NULL reply, which completes each request
 *   with the node's fail_status.
 * - hiredis forbids freeing a context from inside its callbacks: callbacks
 *   that need a node dropped arm the node's kill timer (0 s) instead.
 */
#include "actors/remote.h"

#include <errno.h>
#include <ev.h>
#include <hiredis/async.h>
#include <hiredis/hiredis.h>
#include <hiredis/sds.h>
#include <inttypes.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include "actors/redis_cluster.h"
#include "actors/redis_url.h"
#include "runtime/log.h"
#include "runtime/outbox.h"

/* Exported by libhiredis 0.14 but not declared in its headers. */
void redisProcessCallbacks(redisAsyncContext *ac);

#define _NO_NODE 0xffffu
#define _MAX_NODES 256u
#define _MAX_REDIRECTS 3u
#define _READ_STEP (1u << 20)         /* bytes per read(2) */
#define _READ_BUDGET (16u << 20)      /* bytes read per wake-up, at most */
#define _WRITE_BUDGET (16u << 20)     /* bytes written per wake-up, at most */
#define _IOV_MAX 64
#define _NOTIFY_RETRY_S 0.0002
#define _CLOSE_NOTIFY_NS 5000000000ull
#define _BACKOFF_MIN_S 0.01
#define _BACKOFF_MAX_S 1.0
#define _REFRESH_MIN_NS 100000000ull  /* 100 ms between slot table refreshes */

enum { _MSG_REQ = 1, _MSG_DRAIN = 2, _MSG_READY = 3 };

/* What a request does. The first four are the caller's; the rest internal. */
enum _kind {
	_K_WRITE = 0,  /* SET key value [PX ms] */
	_K_READ = 1,   /* GET key */
	_K_EXISTS = 2, /* EXISTS key (one key of a batch) */
	_K_DEL = 3,    /* UNLINK key */
	_K_PURGE,      /* UNLINK of a corrupt value (internal, no completion) */
	_K_HELLO,      /* AUTH / SELECT / PING handshake step */
	_K_SLOTS,      /* CLUSTER SLOTS */
	_K_ASKING,     /* ASKING before a redirected command */
};

enum _state { _N_DOWN = 0, _N_CONNECTING = 1, _N_UP = 2 };

struct _batch {
	uint64_t cookie;
	struct kvrt_chunk_key first; /* echoed in EXISTS_DONE */
	uint32_t n;                  /* keys */
	uint32_t left;               /* keys not answered yet */
	int8_t *present;             /* per key: 1 yes, 0 no */
	int *status;                 /* per key: 0 or -errno */
};

struct _node;

struct _req {
	enum _kind kind;
	struct kvrt_chunk_key key;
	char name[KVRT_REMOTE_KEY_BUF]; /* Redis key */
	uint32_t slot;                  /* its hash slot */
	uint64_t cookie;
	uint64_t deadline_ns;
	/* write */
	struct kvrt_chunk_header h;
	const uint8_t *payload;
	/* read */
	uint8_t *dst;
	uint64_t cap;
	/* exists */
	struct _batch *batch;
	uint32_t idx;
	/* result */
	int status;
	uint64_t bytes;
	bool verified;                  /* the reader hook handled the reply */
	uint8_t redirects;
	bool last_hello;                /* the handshake's last step */
	struct _node *node;             /* where it is in flight */
	struct _req *next;              /* FIFO link */
	/* frame: RESP bytes kvrt owns until the reply (the payload is by reference) */
	uint32_t head_len, tail_len;
	uint8_t *head;                  /* = inl, or malloc'd for long commands */
	uint8_t tail[64];
	uint8_t inl[224];
};

struct _seg {
	const uint8_t *p;
	size_t len;
};

struct _node {
	struct kvrt_remote *r;
	uint32_t idx;
	char host[256];
	int port;
	char addr[300];            /* "host:port" for messages */
	enum _state state;
	redisAsyncContext *ac;
	bool tcp_up;               /* hiredis reported the connect */
	bool reading, hwriting;    /* hiredis asked for read / write events */
	int fail_status;           /* what requests get when the context dies */
	struct _req *fl_head, *fl_tail; /* in flight, in callback order */
	uint32_t nfl;
	struct _seg *segs;         /* bytes to write, a ring */
	uint32_t sg_head, sg_count, sg_cap;
	size_t sg_off;             /* bytes of the head segment written */
	ev_io rio, hwio, wio;      /* hiredis read, hiredis write (connect), kvrt write */
	ev_timer retry_w;          /* reconnect */
	ev_timer kill_w;           /* drop from outside hiredis callbacks */
	int kill_status;
	double backoff;
	uint64_t since_ns;         /* connect started */
	bool warned;               /* down warning given */
};

struct _counters {
	_Atomic uint64_t writes, write_bytes, reads, read_bytes, misses, exists_batches,
		exists_keys, removes, dropped_full, dropped_down, err_timeout, err_conn,
		err_corrupt, err_remote, moved, asked, refreshes, connects, disconnects,
		notify_delayed, notify_lost;
	_Atomic uint32_t nodes, nodes_up, cluster;
};

struct kvrt_remote {
	struct kvrt_remote_config cfg;
	char *url;                  /* copy */
	struct kvrt_redis_url u;     /* the URL, parsed (actors/redis_url.h) */
	bool cluster;               /* a cluster (the URL said so, or a MOVED did) */
	uint64_t timeout_ns;
	struct kvrt_actor *actor;
	struct ev_loop *loop;

	/* actor-owned */
	struct _node *nodes[_MAX_NODES];
	uint32_t nnodes;
	uint16_t *slots;            /* KVRT_REDIS_SLOTS entries: node index or _NO_NODE */
	bool have_slots;            /* a slot table was loaded once */
	bool refreshing;            /* CLUSTER SLOTS in flight */
	bool refresh_wanted;
	uint64_t last_refresh_ns;
	uint32_t refresh_rr;        /* round robin over nodes */
	struct _req *wq_head, *wq_tail; /* waiting for the first slot table */
	uint64_t live;              /* caller requests not completed */
	struct kvrt_completion *ready_c; /* open's wait */
	uint64_t ready_deadline;
	int auth_error;
	struct kvrt_completion *drain_c; /* close's wait */
	uint64_t drain_deadline;
	ev_timer tick_w;
	struct kvrt_outbox ob;      /* completions to cfg.notify */
	bool err_logged;            /* one kvrt_error per kind of Redis error */
	redisReplyObjectFunctions fns;   /* hooked reader functions */
	redisReplyObjectFunctions *orig; /* hiredis' own */

	_Atomic bool closing;
	_Atomic uint32_t pending_writes;
	uint32_t max_pending;
	struct _counters c;
};

#define _INC(r, f, n) atomic_fetch_add_explicit(&(r)->c.f, (n), memory_order_relaxed)
#define _GET(r, f) atomic_load_explicit(&(r)->c.f, memory_order_relaxed)
#define _SETC(r, f, v) atomic_store_explicit(&(r)->c.f, (v), memory_order_relaxed)

static char _sentinel; /* the reply object of a GET the reader hook handled */

static const char *_kind_cmd[] = {"SET", "GET", "EXISTS", "UNLINK", "UNLINK"};

/* --- completions to notify ------------------------------------------------ */

static void _notify(struct kvrt_remote *r, enum kvrt_remote_event ev, struct kvrt_chunk_key k,
		    int status, uint64_t cookie, uint64_t bytes, uint32_t arg32)
{
	struct kvrt_msg m = {.type = r->cfg.msg_base + ev, .arg32 = arg32};
	m.arg.u64[0] = k.lo;
	m.arg.u64[1] = k.hi;
	m.arg.i64[2] = status;
	m.arg.u64[3] = cookie;
	m.arg.u64[4] = bytes;
	int rc = kvrt_outbox_send(&r->ob, &m);
	if (rc == 1) {
		_INC(r, notify_delayed, 1);
	} else if (rc < 0) {
		_INC(r, notify_lost, 1);
		kvrt_error("remote: out of memory queueing a completion: lost");
	}
}

/* --- request completion --------------------------------------------------- */

static void _req_free(struct _req *q)
{
	if (q->head && q->head != q->inl)
		free(q->head);
	free(q);
}

static void _count_error(struct kvrt_remote *r, int st)
{
	switch (st) {
	case -ETIMEDOUT:
		_INC(r, err_timeout, 1);
		break;
	case -ECONNRESET:
	case -ECONNREFUSED:
	case -ENOTCONN:
	case -EHOSTUNREACH:
		_INC(r, err_conn, 1);
		break;
	case -EBADMSG:
		_INC(r, err_corrupt, 1);
		break;
	case -EREMOTEIO:
		_INC(r, err_remote, 1);
		break;
	default:
		break;
	}
}

static void _check_drain(struct kvrt_remote *r)
{
	if (r->drain_c && r->live == 0) {
		kvrt_completion_signal(r->drain_c, 0);
		r->drain_c = NULL;
	}
}

/* Finish q with its status (q->status) and free it. */
static void _complete(struct kvrt_remote *r, struct _req *q)
{
	int st = q->status;
	switch (q->kind) {
	case _K_WRITE:
		if (st == 0) {
			_INC(r, writes, 1);
			_INC(r, write_bytes, q->h.payload_len);
		} else if (st == -ENOTCONN || st == -EHOSTUNREACH) {
			_INC(r, dropped_down, 1);
		}
		if (st)
			_count_error(r, st);
		atomic_fetch_sub_explicit(&r->pending_writes, 1, memory_order_relaxed);
		_notify(r, KVRT_REMOTE_WRITTEN, q->key, st, q->cookie, st ? 0 : q->h.payload_len, 0);
		break;
	case _K_READ:
		if (st == 0) {
			_INC(r, reads, 1);
			_INC(r, read_bytes, q->bytes);
		} else if (st == -ENOENT) {
			_INC(r, misses, 1);
		} else {
			_count_error(r, st);
		}
		_notify(r, KVRT_REMOTE_READ_DONE, q->key, st, q->cookie, st ? 0 : q->bytes,
			st ? 0 : q->h.num_tokens);
		break;
	case _K_DEL:
		if (st == 0)
			_INC(r, removes, 1);
		else
			_count_error(r, st);
		_notify(r, KVRT_REMOTE_REMOVED, q->key, st, q->cookie, st ? 0 : q->bytes, 0);
		break;
	case _K_EXISTS: {
		struct _batch *b = q->batch;
		b->present[q->idx] = st == 0 && q->bytes;
		b->status[q->idx] = st;
		if (st)
			_count_error(r, st);
		if (--b->left == 0) {
			uint32_t lead = 0;
			int bst = 0;
			while (lead < b->n && b->present[lead])
				lead++;
			/* An error before the first "no" makes the answer uncertain. */
			if (lead < b->n)
				bst = b->status[lead];
			_INC(r, exists_batches, 1);
			_INC(r, exists_keys, b->n);
			_notify(r, KVRT_REMOTE_EXISTS_DONE, b->first, bst, b->cookie, lead, b->n);
			free(b->present);
			free(b->status);
			free(b);
			r->live--;
		}
		_req_free(q);
		_check_drain(r);
		return;
	}
	case _K_PURGE:
	case _K_ASKING:
		_req_free(q);
		return;
	case _K_HELLO:
	case _K_SLOTS:
		KVRT_ASSERT(!"internal requests are finished by their callbacks");
	}
	_req_free(q);
	r->live--;
	_check_drain(r);
}

static void _fail(struct kvrt_remote *r, struct _req *q, int status)
{
	q->status = status;
	_complete(r, q);
}

/* --- node output: kvrt's write path ----------------------------------------- */

static int _seg_push(struct _node *n, const uint8_t *p, size_t len)
{
	if (!len)
		return 0;
	if (n->sg_count == n->sg_cap) {
		uint32_t nc = n->sg_cap ? n->sg_cap * 2 : 64;
		struct _seg *ns = malloc(nc * sizeof *ns);
		if (!ns)
			return -ENOMEM;
		for (uint32_t i = 0; i < n->sg_count; i++)
			ns[i] = n->segs[(n->sg_head + i) % n->sg_cap];
		free(n->segs);
		n->segs = ns;
		n->sg_cap = nc;
		n->sg_head = 0;
	}
	n->segs[(n->sg_head + n->sg_count) % n->sg_cap] = (struct _seg){p, len};
	n->sg_count++;
	return 0;
}

static void _seg_clear(struct _node *n)
{
	n->sg_head = n->sg_count = 0;
	n->sg_off = 0;
}

static void _node_drop(struct _node *n, int status);

static void _on_writable(struct ev_loop *loop, ev_io *w, int revents)
{
	(void)loop;
	(void)revents;
	struct _node *n = w->data;
	size_t budget = _WRITE_BUDGET;
	while (n->sg_count && budget) {
		struct iovec iov[_IOV_MAX];
		int cnt = 0;
		for (uint32_t i = 0; i < n->sg_count && cnt < _IOV_MAX; i++) {
			struct _seg *s = &n->segs[(n->sg_head + i) % n->sg_cap];
			size_t off = i == 0 ? n->sg_off : 0;
			iov[cnt].iov_base = (void *)(s->p + off);
			iov[cnt].iov_len = s->len - off;
			cnt++;
		}
		struct msghdr mh = {.msg_iov = iov, .msg_iovlen = (size_t)cnt};
		ssize_t k = sendmsg(n->ac->c.fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
		if (k < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN || errno == EWOULDBLOCK)
				return;
			kvrt_debug("remote %s: send: %s", n->addr, strerror(errno));
			_node_drop(n, -ECONNRESET);
			return;
		}
		size_t done = (size_t)k;
		budget = done >= budget ? 0 : budget - done;
		while (done) {
			struct _seg *s = &n->segs[n->sg_head];
			size_t left = s->len - n->sg_off;
			if (done >= left) {
				done -= left;
				n->sg_off = 0;
				n->sg_head = (n->sg_head + 1) % n->sg_cap;
				n->sg_count--;
			} else {
				n->sg_off += done;
				done = 0;
			}
		}
	}
	if (!n->sg_count)
		ev_io_stop(n->r->loop, &n->wio);
}

/* --- node input: reads into hiredis' reader ------------------------------------ */

static void _on_readable(struct ev_loop *loop, ev_io *w, int revents)
{
	(void)loop;
	(void)revents;
	struct _node *n = w->data;
	redisAsyncContext *ac = n->ac;
	if (!ac)
		return;
	if (!(ac->c.flags & REDIS_CONNECTED)) {
		redisAsyncHandleRead(ac);
		return;
	}
	redisReader *rd = ac->c.reader;
	size_t total = 0;
	while (total < _READ_BUDGET) {
		if (rd->err)
			break;
		sds nb = sdsMakeRoomFor(rd->buf, _READ_STEP);
		if (!nb) {
			_node_drop(n, -ENOMEM);
			return;
		}
		rd->buf = nb;
		ssize_t k = read(ac->c.fd, rd->buf + rd->len, _READ_STEP);
		if (k > 0) {
			sdsIncrLen(rd->buf, (int)k);
			rd->len += (size_t)k;
			total += (size_t)k;
			redisProcessCallbacks(ac);
			if (n->ac != ac)
				return; /* freed: a protocol error */
			if ((size_t)k < _READ_STEP)
				return;
			continue;
		}
		if (k < 0 && errno == EINTR)
			continue;
		if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			return;
		/* EOF or an error: hiredis reads again, sees it, and disconnects. */
		redisAsyncHandleRead(ac);
		return;
	}
}

static void _on_hwritable(struct ev_loop *loop, ev_io *w, int revents)
{
	(void)loop;
	(void)revents;
	struct _node *n = w->data;
	if (n->ac)
		redisAsyncHandleWrite(n->ac);
}

/* hiredis' event hooks (the role of adapters/libev.h). */
static void _ev_add_read(void *p)
{
	struct _node *n = p;
	if (!n->reading) {
		n->reading = true;
		ev_io_start(n->r->loop, &n->rio);
	}
}

static void _ev_del_read(void *p)
{
	struct _node *n = p;
	if (n->reading) {
		n->reading = false;
		ev_io_stop(n->r->loop, &n->rio);
	}
}

static void _ev_add_write(void *p)
{
	struct _node *n = p;
	if (!n->hwriting) {
		n->hwriting = true;
		ev_io_start(n->r->loop, &n->hwio);
	}
}

static void _ev_del_write(void *p)
{
	struct _node *n = p;
	if (n->hwriting) {
		n->hwriting = false;
		ev_io_stop(n->r->loop, &n->hwio);
	}
}

static void _ev_cleanup(void *p)
{
	struct _node *n = p;
	_ev_del_read(p);
	_ev_del_write(p);
	ev_io_stop(n->r->loop, &n->wio);
}

/* --- the reader hook: GET values verified and copied once ------------------------ */

static int _verify_copy(struct kvrt_remote *r, struct _req *q, const uint8_t *s, size_t len)
{
	struct kvrt_chunk_header h;
	if (len < KVRT_CHUNK_HEADER_SIZE)
		return -EBADMSG;
	if (kvrt_chunk_header_decode(s, len, &h) != 0)
		return -EBADMSG;
	if (!kvrt_chunk_key_eq(h.key, q->key) || h.namespace_hash != r->cfg.namespace_hash)
		return -EBADMSG;
	if (len - KVRT_CHUNK_HEADER_SIZE != h.payload_len)
		return -EBADMSG;
	if (h.payload_len > q->cap)
		return -EMSGSIZE;
	if (kvrt_chunk_verify(s, s + KVRT_CHUNK_HEADER_SIZE, h.payload_len, NULL) != 0)
		return -EBADMSG;
	memcpy(q->dst, s + KVRT_CHUNK_HEADER_SIZE, h.payload_len);
	q->bytes = h.payload_len;
	q->h = h; /* num_tokens for READ_DONE */
	return 0;
}

static void *_hook_string(const redisReadTask *t, char *s, size_t len)
{
	struct _node *n = t->privdata;
	struct _req *q = n ? n->fl_head : NULL;
	if (q && q->kind == _K_READ && !t->parent && t->type == REDIS_REPLY_STRING) {
		q->status = _verify_copy(n->r, q, (const uint8_t *)s, len);
		q->verified = true;
		return &_sentinel;
	}
	return n->r->orig->createString(t, s, len);
}

static void *_hook_array(const redisReadTask *t, int elements)
{
	struct _node *n = t->privdata;
	if (!kvrt_redis_array_ok(elements))
		return NULL; /* the reader fails: the node drops, its requests fail */
	return n->r->orig->createArray(t, elements);
}

static void *_hook_integer(const redisReadTask *t, long long v)
{
	struct _node *n = t->privdata;
	return n->r->orig->createInteger(t, v);
}

static void *_hook_nil(const redisReadTask *t)
{
	struct _node *n = t->privdata;
	return n->r->orig->createNil(t);
}

/* hiredis' default freeObject, saved at the first connect (all equal). */
static void (*_orig_free)(void *);

static void _hook_free(void *o)
{
	if (o != &_sentinel && _orig_free)
		_orig_free(o);
}

/* --- nodes ------------------------------------------------------------------- */

static void _node_connect(struct _node *n);
static void _on_reply(redisAsyncContext *ac, void *reply, void *priv);
static void _refresh(struct kvrt_remote *r, bool force);
static void _route(struct kvrt_remote *r, struct _req *q);

static void _fl_push(struct _node *n, struct _req *q)
{
	q->next = NULL;
	if (n->fl_tail)
		n->fl_tail->next = q;
	else
		n->fl_head = q;
	n->fl_tail = q;
	n->nfl++;
	q->node = n;
}

static struct _req *_fl_pop(struct _node *n)
{
	struct _req *q = n->fl_head;
	if (q) {
		n->fl_head = q->next;
		if (!n->fl_head)
			n->fl_tail = NULL;
		n->nfl--;
		q->next = NULL;
	}
	return q;
}

static void _count_nodes_up(struct kvrt_remote *r)
{
	uint32_t up = 0;
	for (uint32_t i = 0; i < r->nnodes; i++)
		up += r->nodes[i]->state == _N_UP;
	_SETC(r, nodes_up, up);
}

/* Append a bulk string to a frame. */
static size_t _bulk(uint8_t *o, const char *s, size_t n)
{
	int k = sprintf((char *)o, "$%zu\r\n", n);
	memcpy(o + k, s, n);
	memcpy(o + k + n, "\r\n", 2);
	return (size_t)k + n + 2;
}

/* Build q's RESP frame (head; the payload and tail for SET). */
static int _frame(struct kvrt_remote *r, struct _req *q)
{
	uint8_t *o = q->inl;
	size_t k = 0;
	q->head = q->inl;
	q->tail_len = 0;
	switch (q->kind) {
	case _K_WRITE: {
		uint64_t vlen = KVRT_CHUNK_HEADER_SIZE + q->h.payload_len;
		k += (size_t)sprintf((char *)o, "*%d\r\n", r->cfg.ttl_s ? 5 : 3);
		k += _bulk(o + k, "SET", 3);
		k += _bulk(o + k, q->name, KVRT_REMOTE_KEY_LEN);
		k += (size_t)sprintf((char *)o + k, "$%" PRIu64 "\r\n", vlen);
		/* the encoded header follows in the same segment */
		kvrt_chunk_header_encode(&q->h, o + k);
		uint64_t sum = kvrt_chunk_checksum(o + k, q->payload, q->h.payload_len);
		kvrt_chunk_header_set_checksum(o + k, sum);
		k += KVRT_CHUNK_HEADER_SIZE;
		size_t t = 0;
		memcpy(q->tail, "\r\n", 2);
		t = 2;
		if (r->cfg.ttl_s) {
			char ms[24];
			int ml = snprintf(ms, sizeof ms, "%" PRIu64, (uint64_t)r->cfg.ttl_s * 1000);
			t += _bulk(q->tail + t, "PX", 2);
			t += _bulk(q->tail + t, ms, (size_t)ml);
		}
		q->tail_len = (uint32_t)t;
		break;
	}
	case _K_READ:
	case _K_EXISTS:
	case _K_DEL:
	case _K_PURGE: {
		const char *c = _kind_cmd[q->kind];
		k += (size_t)sprintf((char *)o, "*2\r\n");
		k += _bulk(o + k, c, strlen(c));
		k += _bulk(o + k, q->name, KVRT_REMOTE_KEY_LEN);
		break;
	}
	case _K_ASKING:
		k += (size_t)sprintf((char *)o, "*1\r\n");
		k += _bulk(o + k, "ASKING", 6);
		break;
	case _K_SLOTS:
		k += (size_t)sprintf((char *)o, "*2\r\n");
		k += _bulk(o + k, "CLUSTER", 7);
		k += _bulk(o + k, "SLOTS", 5);
		break;
	case _K_HELLO:
		break; /* built by _node_hello */
	}
	KVRT_ASSERT(k <= sizeof q->inl);
	if (q->kind != _K_HELLO)
		q->head_len = (uint32_t)k;
	return 0;
}

/* Hand q's frame to node n: register the callback with hiredis, move the
 * bytes into n's segment queue. 0, or -ENOTCONN (context closing). */
static int _send(struct _node *n, struct _req *q)
{
	redisAsyncContext *ac = n->ac;
	if (!ac || n->state == _N_DOWN)
		return -ENOTCONN;
	/* hiredis wants a complete-looking command to find its name; the head
	 * starts with "*N\r\n$L\r\nNAME\r\n" in every case. */
	if (redisAsyncFormattedCommand(ac, _on_reply, q, (const char *)q->head, q->head_len) !=
	    REDIS_OK)
		return -ENOTCONN;
	sdsclear(ac->c.obuf);
	int rc = _seg_push(n, q->head, q->head_len);
	if (!rc && q->kind == _K_WRITE) {
		rc = _seg_push(n, q->payload, q->h.payload_len);
		if (!rc)
			rc = _seg_push(n, q->tail, q->tail_len);
	}
	_fl_push(n, q);
	if (rc) {
		/* The callback is registered: failing the node completes q. */
		ev_timer_stop(n->r->loop, &n->kill_w);
		n->kill_status = -ENOMEM;
		ev_timer_set(&n->kill_w, 0, 0);
		ev_timer_start(n->r->loop, &n->kill_w);
		return 0;
	}
	if (n->tcp_up) {
		/* hiredis asked for a write event it has nothing to write for. */
		_ev_del_write(n);
		if (!ev_is_active(&n->wio))
			ev_io_start(n->r->loop, &n->wio);
	}
	return 0;
}

static struct _req *_ctl_req(enum _kind kind)
{
	struct _req *q = calloc(1, sizeof *q);
	if (!q)
		return NULL;
	q->kind = kind;
	q->deadline_ns = UINT64_MAX; /* set by the caller */
	return q;
}

static void _node_down(struct _node *n)
{
	struct kvrt_remote *r = n->r;
	bool was_up = n->state == _N_UP;
	n->state = _N_DOWN;
	n->tcp_up = false;
	n->reading = n->hwriting = false;
	ev_io_stop(r->loop, &n->wio);
	ev_io_stop(r->loop, &n->rio);
	ev_io_stop(r->loop, &n->hwio);
	_seg_clear(n);
	if (was_up)
		_INC(r, disconnects, 1);
	_count_nodes_up(r);
	ev_timer_stop(r->loop, &n->retry_w);
	ev_timer_set(&n->retry_w, n->backoff, 0);
	ev_timer_start(r->loop, &n->retry_w);
	n->backoff = n->backoff * 2 > _BACKOFF_MAX_S ? _BACKOFF_MAX_S : n->backoff * 2;
	if (r->cluster)
		r->refresh_wanted = true;
}

/* Drop n's context (not from inside a hiredis callback): every request in
 * flight on it completes with status. */
static void _node_drop(struct _node *n, int status)
{
	redisAsyncContext *ac = n->ac;
	if (!ac)
		return;
	n->ac = NULL;
	n->fail_status = status;
	ev_io_stop(n->r->loop, &n->wio);
	_seg_clear(n);
	if (status == -ETIMEDOUT && !n->warned) {
		kvrt_warn("remote %s: no reply within %u ms: connection dropped, its requests are misses; reconnecting",
			  n->addr, n->r->cfg.timeout_ms);
		n->warned = true;
	}
	redisAsyncFree(ac); /* -> _on_reply(NULL) per request, then _on_disconnect */
	_node_down(n);
}

static void _on_kill(struct ev_loop *loop, ev_timer *w, int revents)
{
	(void)loop;
	(void)revents;
	struct _node *n = w->data;
	_node_drop(n, n->kill_status);
}

static void _node_kill_soon(struct _node *n, int status)
{
	n->kill_status = status;
	if (!ev_is_active(&n->kill_w)) {
		ev_timer_set(&n->kill_w, 0, 0);
		ev_timer_start(n->r->loop, &n->kill_w);
	}
}

static void _on_connect(const redisAsyncContext *ac, int status)
{
	struct _node *n = ac->data;
	if (n->ac != ac)
		return;
	if (status == REDIS_OK) {
		n->tcp_up = true;
		if (n->sg_count)
			ev_io_start(n->r->loop, &n->wio);
		return;
	}
	/* hiredis frees the context after this: pending callbacks get NULL. */
	if (!n->warned) {
		kvrt_warn("remote %s: cannot connect (%s): its chunks are misses until it is back",
			  n->addr, ac->errstr ? ac->errstr : "refused");
		n->warned = true;
	}
	n->fail_status = -ECONNREFUSED;
	n->ac = NULL;
	_node_down(n);
}

static void _on_disconnect(const redisAsyncContext *ac, int status)
{
	(void)status;
	struct _node *n = ac->data;
	if (n->ac != ac)
		return; /* we dropped it */
	if (!n->warned) {
		kvrt_warn("remote %s: connection lost (%s): its chunks are misses until it is back",
			  n->addr, ac->errstr && *ac->errstr ? ac->errstr : "closed");
		n->warned = true;
	}
	n->ac = NULL;
	_node_down(n);
}

static void _on_reconnect(struct ev_loop *loop, ev_timer *w, int revents)
{
	(void)loop;
	(void)revents;
	struct _node *n = w->data;
	if (!atomic_load_explicit(&n->r->closing, memory_order_relaxed))
		_node_connect(n);
}

/* Queue the handshake: AUTH, SELECT, PING. */
static int _node_hello(struct _node *n)
{
	struct kvrt_remote *r = n->r;
	const char *argv[3];
	size_t argl[3];
	int argc;
	for (int step = 0; step < 3; step++) {
		char dbs[16];
		if (step == 0) {
			if (!r->u.pass)
				continue;
			argv[0] = "AUTH";
			argc = 1;
			if (r->u.user) {
				argv[argc++] = r->u.user;
			}
			argv[argc++] = r->u.pass;
		} else if (step == 1) {
			if (!r->u.db)
				continue;
			snprintf(dbs, sizeof dbs, "%d", r->u.db);
			argv[0] = "SELECT";
			argv[1] = dbs;
			argc = 2;
		} else {
			argv[0] = "PING";
			argc = 1;
		}
		for (int i = 0; i < argc; i++)
			argl[i] = strlen(argv[i]);
		struct _req *q = _ctl_req(_K_HELLO);
		if (!q)
			return -ENOMEM;
		char *cmd;
		int len = redisFormatCommandArgv(&cmd, argc, argv, argl);
		if (len < 0) {
			free(q);
			return -ENOMEM;
		}
		if ((size_t)len <= sizeof q->inl) {
			memcpy(q->inl, cmd, (size_t)len);
			q->head = q->inl;
			free(cmd);
		} else {
			q->head = (uint8_t *)cmd; /* malloc'd by hiredis: free() is fine */
		}
		q->head_len = (uint32_t)len;
		q->last_hello = step == 2;
		q->deadline_ns = kvrt_now_ns() + r->timeout_ns;
		int rc = _send(n, q);
		if (rc) {
			_req_free(q);
			return rc;
		}
	}
	return 0;
}

static void _node_connect(struct _node *n)
{
	struct kvrt_remote *r = n->r;
	if (n->ac)
		return;
	redisAsyncContext *ac = redisAsyncConnect(n->host, n->port);
	if (!ac || ac->err) {
		if (!n->warned) {
			kvrt_warn("remote %s: cannot connect (%s)", n->addr,
				  ac && ac->errstr ? ac->errstr : "out of memory");
			n->warned = true;
		}
		if (ac)
			redisAsyncFree(ac);
		n->state = _N_CONNECTING; /* so _node_down schedules a retry */
		_node_down(n);
		return;
	}
	if (!r->orig) {
		r->orig = ac->c.reader->fn;
		_orig_free = r->orig->freeObject;
		r->fns = (redisReplyObjectFunctions){
			.createString = _hook_string,
			.createArray = _hook_array,
			.createInteger = _hook_integer,
			.createNil = _hook_nil,
			.freeObject = _hook_free,
		};
	}
	ac->c.reader->fn = &r->fns;
	ac->c.reader->privdata = n;
	ac->c.reader->maxbuf = 0; /* keep the buffer: values are MiBs */
	ac->data = n;
	ac->ev.data = n;
	ac->ev.addRead = _ev_add_read;
	ac->ev.delRead = _ev_del_read;
	ac->ev.addWrite = _ev_add_write;
	ac->ev.delWrite = _ev_del_write;
	ac->ev.cleanup = _ev_cleanup;
	ev_io_init(&n->rio, _on_readable, ac->c.fd, EV_READ);
	ev_io_init(&n->hwio, _on_hwritable, ac->c.fd, EV_WRITE);
	ev_io_init(&n->wio, _on_writable, ac->c.fd, EV_WRITE);
	n->rio.data = n->hwio.data = n->wio.data = n;
	n->reading = n->hwriting = n->tcp_up = false;
	redisAsyncSetConnectCallback(ac, _on_connect);
	redisAsyncSetDisconnectCallback(ac, _on_disconnect);
	n->ac = ac;
	n->fail_status = 0;
	n->state = _N_CONNECTING;
	n->since_ns = kvrt_now_ns();
	if (_node_hello(n) != 0)
		_node_kill_soon(n, -ENOMEM);
}

static struct _node *_node_get(struct kvrt_remote *r, const char *host, int port)
{
	for (uint32_t i = 0; i < r->nnodes; i++)
		if (r->nodes[i]->port == port && !strcmp(r->nodes[i]->host, host))
			return r->nodes[i];
	if (r->nnodes == _MAX_NODES)
		return NULL;
	struct _node *n = calloc(1, sizeof *n);
	if (!n)
		return NULL;
	n->r = r;
	n->idx = r->nnodes;
	snprintf(n->host, sizeof n->host, "%s", host);
	n->port = port;
	snprintf(n->addr, sizeof n->addr, strchr(host, ':') ? "[%s]:%d" : "%s:%d", host, port);
	n->backoff = _BACKOFF_MIN_S;
	ev_timer_init(&n->retry_w, _on_reconnect, 0, 0);
	n->retry_w.data = n;
	ev_timer_init(&n->kill_w, _on_kill, 0, 0);
	n->kill_w.data = n;
	r->nodes[r->nnodes++] = n;
	_SETC(r, nodes, r->nnodes);
	_node_connect(n);
	return n;
}

/* --- cluster topology ---------------------------------------------------------- */

static void _flush_waiting(struct kvrt_remote *r)
{
	struct _req *q = r->wq_head;
	r->wq_head = r->wq_tail = NULL;
	while (q) {
		struct _req *nx = q->next;
		q->next = NULL;
		_route(r, q);
		q = nx;
	}
}

static void _signal_ready(struct kvrt_remote *r, int status)
{
	if (r->ready_c) {
		kvrt_completion_signal(r->ready_c, status);
		r->ready_c = NULL;
	}
}

/* One range of a CLUSTER SLOTS reply: its owner becomes a node. */
static bool _slot_range(void *ctx, uint32_t lo, uint32_t hi, const char *host, int port)
{
	struct kvrt_remote *r = ctx;
	struct _node *own = _node_get(r, host, port);
	if (!own)
		return false;
	for (uint32_t s = lo; s <= hi; s++)
		r->slots[s] = (uint16_t)own->idx;
	return true;
}

/* A CLUSTER SLOTS reply from node `from` into the slot table. */
static void _load_slots(struct kvrt_remote *r, struct _node *from, redisReply *rep)
{
	uint32_t covered = kvrt_redis_parse_slots(rep, from->host, _slot_range, r);
	_INC(r, refreshes, 1);
	if (covered < KVRT_REDIS_SLOTS)
		kvrt_debug("remote: cluster slot table covers %u of %u slots", covered, KVRT_REDIS_SLOTS);
	if (!r->have_slots && covered) {
		r->have_slots = true;
		_signal_ready(r, 0);
	}
	_flush_waiting(r);
}

static void _refresh(struct kvrt_remote *r, bool force)
{
	if (!r->cluster || r->refreshing)
		return;
	uint64_t now = kvrt_now_ns();
	if (!force && now - r->last_refresh_ns < _REFRESH_MIN_NS) {
		r->refresh_wanted = true;
		return;
	}
	for (uint32_t k = 0; k < r->nnodes; k++) {
		struct _node *n = r->nodes[(r->refresh_rr + k) % r->nnodes];
		if (n->state == _N_DOWN)
			continue;
		struct _req *q = _ctl_req(_K_SLOTS);
		if (!q)
			return;
		_frame(r, q);
		q->deadline_ns = now + r->timeout_ns;
		if (_send(n, q) != 0) {
			_req_free(q);
			continue;
		}
		r->refresh_rr = (r->refresh_rr + k + 1) % r->nnodes;
		r->refreshing = true;
		r->refresh_wanted = false;
		r->last_refresh_ns = now;
		return;
	}
	r->refresh_wanted = true; /* nobody reachable now: the tick retries */
}

/* --- routing -------------------------------------------------------------------- */

static void _route_to(struct kvrt_remote *r, struct _node *n, struct _req *q, bool asking)
{
	if (!n || n->state == _N_DOWN) {
		_fail(r, q, -ENOTCONN);
		return;
	}
	if (asking) {
		struct _req *a = _ctl_req(_K_ASKING);
		if (!a) {
			_fail(r, q, -ENOMEM);
			return;
		}
		_frame(r, a);
		a->deadline_ns = q->deadline_ns;
		if (_send(n, a) != 0) {
			_req_free(a);
			_fail(r, q, -ENOTCONN);
			return;
		}
	}
	if (_send(n, q) != 0)
		_fail(r, q, -ENOTCONN);
}

static void _route(struct kvrt_remote *r, struct _req *q)
{
	if (!r->cluster) {
		_route_to(r, r->nodes[0], q, false);
		return;
	}
	if (!r->have_slots) {
		q->next = NULL;
		if (r->wq_tail)
			r->wq_tail->next = q;
		else
			r->wq_head = q;
		r->wq_tail = q;
		_refresh(r, false);
		return;
	}
	uint16_t idx = r->slots[q->slot];
	if (idx == _NO_NODE) {
		_refresh(r, false);
		_fail(r, q, -EHOSTUNREACH);
		return;
	}
	_route_to(r, r->nodes[idx], q, false);
}

/* An error reply to a caller's request: redirect or fail. */
static void _on_error_reply(struct kvrt_remote *r, struct _node *n, struct _req *q,
			    const char *msg)
{
	uint32_t slot;
	char host[256];
	int port;
	bool moved = kvrt_redis_parse_redirect(msg, "MOVED", &slot, host, &port);
	bool ask = !moved && kvrt_redis_parse_redirect(msg, "ASK", &slot, host, &port);
	if (moved || ask) {
		if (!r->cluster) {
			kvrt_warn("remote %s: server is a Redis Cluster node (got %s): switching to cluster mode; prefer redis-cluster:// in remote_url",
				  n->addr, moved ? "MOVED" : "ASK");
			r->cluster = true;
			_SETC(r, cluster, 1);
			for (uint32_t s = 0; s < KVRT_REDIS_SLOTS; s++)
				r->slots[s] = _NO_NODE;
			r->have_slots = true; /* filled by redirects and the refresh */
			_refresh(r, true);
		}
		if (++q->redirects > _MAX_REDIRECTS) {
			_fail(r, q, -EREMOTEIO);
			return;
		}
		struct _node *to = _node_get(r, host, port);
		if (moved) {
			_INC(r, moved, 1);
			if (to)
				r->slots[slot] = (uint16_t)to->idx;
			_refresh(r, false);
		} else {
			_INC(r, asked, 1);
		}
		_route_to(r, to, q, ask);
		return;
	}
	if (!r->err_logged) {
		kvrt_error("remote %s: Redis error on %s: %s (further errors counted in stats.err_remote)",
			   n->addr, q->kind <= _K_PURGE ? _kind_cmd[q->kind] : "command", msg);
		r->err_logged = true;
	}
	if (!strncmp(msg, "CLUSTERDOWN", 11) || !strncmp(msg, "TRYAGAIN", 8))
		_refresh(r, false);
	_fail(r, q, -EREMOTEIO);
}

/* hiredis reply callback: every request sent ends here exactly once. */
static void _on_reply(redisAsyncContext *ac, void *reply, void *priv)
{
	struct _req *q = priv;
	struct _node *n = ac->data;
	struct kvrt_remote *r = n->r;
	struct _req *h = _fl_pop(n);
	KVRT_ASSERT(h == q);
	redisReply *rep = reply && reply != &_sentinel ? reply : NULL;

	if (!reply) {
		int st = n->fail_status ? n->fail_status : -ECONNRESET;
		switch (q->kind) {
		case _K_HELLO:
		case _K_SLOTS:
			if (q->kind == _K_SLOTS)
				r->refreshing = false;
			_req_free(q);
			return;
		default:
			_fail(r, q, st);
			return;
		}
	}

	switch (q->kind) {
	case _K_HELLO:
		if (rep && rep->type == REDIS_REPLY_ERROR) {
			bool auth = !strncmp((const char *)q->head + 8, "AUTH", 4) ||
				    strstr(rep->str, "AUTH") || strstr(rep->str, "WRONGPASS");
			kvrt_error("remote %s: %s refused: %s", n->addr, auth ? "authentication" : "handshake",
				   rep->str);
			if (auth) {
				r->auth_error = -EACCES;
				_signal_ready(r, -EACCES);
			}
			_node_kill_soon(n, auth ? -EACCES : -EREMOTEIO);
		} else if (q->last_hello) {
			n->state = _N_UP;
			n->backoff = _BACKOFF_MIN_S;
			if (n->warned)
				kvrt_info("remote %s: connected", n->addr);
			n->warned = false;
			_INC(r, connects, 1);
			_count_nodes_up(r);
			if (!r->cluster)
				_signal_ready(r, 0);
			else if (!r->have_slots || r->refresh_wanted)
				_refresh(r, !r->have_slots);
		}
		_req_free(q);
		return;
	case _K_SLOTS:
		r->refreshing = false;
		if (rep && rep->type == REDIS_REPLY_ARRAY) {
			_load_slots(r, n, rep);
		} else if (rep && rep->type == REDIS_REPLY_ERROR) {
			if (strstr(rep->str, "cluster support disabled")) {
				kvrt_error("remote %s: not a Redis Cluster node (%s): use redis://host:port for a single server",
					   n->addr, rep->str);
			} else {
				kvrt_warn("remote %s: CLUSTER SLOTS: %s", n->addr, rep->str);
			}
			r->refresh_wanted = true;
		}
		_req_free(q);
		return;
	case _K_ASKING:
		_req_free(q);
		return;
	default:
		break;
	}

	if (rep && rep->type == REDIS_REPLY_ERROR) {
		_on_error_reply(r, n, q, rep->str);
		return;
	}
	switch (q->kind) {
	case _K_WRITE:
		q->status = rep && rep->type == REDIS_REPLY_STATUS ? 0 : -EREMOTEIO;
		break;
	case _K_READ:
		if (q->verified) {
			if (q->status == -EBADMSG) {
				kvrt_warn("remote %s: value of %s is corrupt or foreign: not served, deleted",
					  n->addr, q->name);
				struct _req *p = _ctl_req(_K_PURGE);
				if (p) {
					memcpy(p->name, q->name, sizeof p->name);
					p->slot = q->slot;
					p->deadline_ns = kvrt_now_ns() + r->timeout_ns;
					_frame(r, p);
					if (_send(n, p) != 0)
						_req_free(p);
				}
			}
		} else if (rep && rep->type == REDIS_REPLY_NIL) {
			q->status = -ENOENT;
		} else {
			q->status = -EBADMSG; /* not a string: someone else's key */
		}
		break;
	case _K_EXISTS:
	case _K_DEL:
		if (rep && rep->type == REDIS_REPLY_INTEGER) {
			q->status = 0;
			q->bytes = rep->integer > 0;
		} else {
			q->status = -EREMOTEIO;
		}
		break;
	default:
		break;
	}
	_complete(r, q);
}

/* --- deadlines ------------------------------------------------------------------------ */

static void _on_tick(struct ev_loop *loop, ev_timer *w, int revents)
{
	(void)loop;
	(void)revents;
	struct kvrt_remote *r = w->data;
	uint64_t now = kvrt_now_ns();
	for (uint32_t i = 0; i < r->nnodes; i++) {
		struct _node *n = r->nodes[i];
		if (!n->ac)
			continue;
		bool late = n->state == _N_CONNECTING && now - n->since_ns > r->timeout_ns;
		for (struct _req *q = n->fl_head; q && !late; q = q->next)
			late = now > q->deadline_ns;
		if (late)
			_node_drop(n, -ETIMEDOUT);
	}
	/* Requests waiting for the first slot table. */
	struct _req **pp = &r->wq_head, *last = NULL;
	while (*pp) {
		struct _req *q = *pp;
		if (now > q->deadline_ns) {
			*pp = q->next;
			_fail(r, q, -ETIMEDOUT);
		} else {
			last = q;
			pp = &q->next;
		}
	}
	r->wq_tail = last;
	if (r->ready_c && now > r->ready_deadline)
		_signal_ready(r, -ETIMEDOUT);
	if (r->drain_c && now > r->drain_deadline) {
		for (uint32_t i = 0; i < r->nnodes; i++)
			_node_drop(r->nodes[i], -ECANCELED);
		while (r->wq_head) {
			struct _req *q = r->wq_head;
			r->wq_head = q->next;
			_fail(r, q, -ECANCELED);
		}
		r->wq_tail = NULL;
		if (r->drain_c) {
			kvrt_completion_signal(r->drain_c, -ETIMEDOUT);
			r->drain_c = NULL;
		}
	}
	if (r->refresh_wanted && !atomic_load_explicit(&r->closing, memory_order_relaxed))
		_refresh(r, false);
}

/* --- the actor ---------------------------------------------------------------------- */

static void _handle(struct kvrt_actor *a, struct kvrt_msg *m)
{
	struct kvrt_remote *r = kvrt_actor_data(a);
	switch (m->type) {
	case _MSG_REQ: {
		struct _req *q = m->arg.ptr[0];
		uint32_t cnt = m->arg32 ? m->arg32 : 1;
		/* An exists batch arrives as one array of requests. */
		if (q->kind == _K_EXISTS) {
			r->live++;
			for (uint32_t i = 0; i < cnt; i++) {
				struct _req *x = ((struct _req **)m->arg.ptr[1])[i];
				_frame(r, x);
				_route(r, x);
			}
			free(m->arg.ptr[1]);
			return;
		}
		r->live++;
		_frame(r, q); /* a write's checksum is computed here */
		_route(r, q);
		return;
	}
	case _MSG_DRAIN:
		r->drain_c = m->reply;
		r->drain_deadline = kvrt_now_ns() + 2 * r->timeout_ns;
		_check_drain(r);
		return;
	case _MSG_READY:
		if (r->auth_error) {
			kvrt_completion_signal(m->reply, r->auth_error);
			return;
		}
		if ((!r->cluster && r->nodes[0]->state == _N_UP) || (r->cluster && r->have_slots)) {
			kvrt_completion_signal(m->reply, 0);
			return;
		}
		r->ready_c = m->reply;
		r->ready_deadline = kvrt_now_ns() + r->timeout_ns;
		return;
	default:
		KVRT_ASSERT(!"unknown remote message");
	}
}

static int _start(struct kvrt_actor *a)
{
	struct kvrt_remote *r = kvrt_actor_data(a);
	r->loop = kvrt_actor_loop(a);
	double tick = (double)r->cfg.timeout_ms / 8000.0;
	if (tick < 0.001)
		tick = 0.001;
	if (tick > 0.05)
		tick = 0.05;
	ev_timer_init(&r->tick_w, _on_tick, tick, tick);
	r->tick_w.data = r;
	ev_timer_start(r->loop, &r->tick_w);
	kvrt_outbox_init(&r->ob, r->cfg.notify, r->loop, _NOTIFY_RETRY_S);
	for (uint32_t i = 0; i < r->u.nhosts; i++)
		if (!_node_get(r, r->u.host[i], r->u.port[i]))
			return -ENOMEM;
	if (r->cluster)
		_refresh(r, true);
	return 0;
}

static void _stop(struct kvrt_actor *a)
{
	struct kvrt_remote *r = kvrt_actor_data(a);
	for (uint32_t i = 0; i < r->nnodes; i++) {
		struct _node *n = r->nodes[i];
		ev_timer_stop(r->loop, &n->retry_w);
		ev_timer_stop(r->loop, &n->kill_w);
		_node_drop(n, -ECANCELED);
		ev_timer_stop(r->loop, &n->retry_w);
	}
	while (r->wq_head) {
		struct _req *q = r->wq_head;
		r->wq_head = q->next;
		_fail(r, q, -ECANCELED);
	}
	r->wq_tail = NULL;
	_signal_ready(r, -ECANCELED);
	if (r->drain_c) {
		kvrt_completion_signal(r->drain_c, 0);
		r->drain_c = NULL;
	}
	ev_timer_stop(r->loop, &r->tick_w);
	/* Deliver what is left, waiting a while for room. */
	int rc;
	uint32_t lost = kvrt_outbox_close(&r->ob, kvrt_now_ns() + _CLOSE_NOTIFY_NS, &rc);
	if (lost) {
		_INC(r, notify_lost, lost);
		kvrt_error("remote: %u completions could not be delivered (%s)", lost,
			   rc == -ESHUTDOWN ? "the notify actor stopped" : "notify mailbox full");
	}
}

static const char *_msg_name(uint32_t type)
{
	switch (type) {
	case _MSG_REQ:
		return "remote_req";
	case _MSG_DRAIN:
		return "remote_drain";
	case _MSG_READY:
		return "remote_ready";
	default:
		return "remote_?";
	}
}

static const struct kvrt_actor_ops _remote_ops = {
	.handle = _handle,
	.start = _start,
	.stop = _stop,
	.msg_name = _msg_name,
};

/* --- public API -------------------------------------------------------------------------- */

static void _free_all(struct kvrt_remote *r)
{
	for (uint32_t i = 0; i < r->nnodes; i++) {
		free(r->nodes[i]->segs);
		free(r->nodes[i]);
	}
	free(r->slots);
	kvrt_outbox_free(&r->ob);
	free(r->url);
	kvrt_redis_url_clear(&r->u);
	free(r);
}

int kvrt_remote_open(struct kvrt_remote **out, const struct kvrt_remote_config *cfg)
{
	*out = NULL;
	if (!cfg) {
		kvrt_error("remote: no configuration");
		return -EINVAL;
	}
	if (!cfg->notify) {
		kvrt_error("remote: a notify actor is required");
		return -EINVAL;
	}
	uint32_t mbox = cfg->mailbox_size ? cfg->mailbox_size : 1024;
	if (mbox < 4 || (mbox & (mbox - 1))) {
		kvrt_error("remote: mailbox_size must be a power of two >= 4");
		return -EINVAL;
	}
	struct kvrt_remote *r = calloc(1, sizeof *r);
	if (!r)
		return -ENOMEM;
	r->cfg = *cfg;
	r->cfg.mailbox_size = mbox;
	if (!r->cfg.timeout_ms)
		r->cfg.timeout_ms = 1000;
	r->timeout_ns = (uint64_t)r->cfg.timeout_ms * 1000000u;
	r->max_pending = cfg->max_pending_writes ? cfg->max_pending_writes : 16;
	int rc = kvrt_redis_url_parse(&r->u, cfg->url);
	r->cluster = r->u.cluster;
	if (rc)
		goto err;
	rc = -ENOMEM;
	r->url = strdup(cfg->url);
	r->slots = malloc(KVRT_REDIS_SLOTS * sizeof *r->slots);
	if (!r->url || !r->slots)
		goto err;
	r->cfg.url = r->url;
	_SETC(r, cluster, r->cluster);
	for (uint32_t s = 0; s < KVRT_REDIS_SLOTS; s++)
		r->slots[s] = _NO_NODE;
	rc = kvrt_actor_create(&r->actor, &(struct kvrt_actor_config){
						  .name = "remote",
						  .mailbox_size = mbox,
						  .ops = &_remote_ops,
						  .data = r,
					  });
	if (rc)
		goto err;
	struct kvrt_completion c;
	kvrt_completion_init(&c);
	struct kvrt_msg m = {.type = _MSG_READY};
	rc = kvrt_actor_call(r->actor, &m, &c, 1000000000ull);
	if (rc == -EACCES) {
		kvrt_remote_close(r);
		return -EACCES;
	}
	if (rc)
		kvrt_warn("remote: %s%s not reachable within %u ms (%s): running with misses, reconnecting in the background",
			  r->cluster ? "Redis Cluster at " : "Redis at ", r->u.host[0],
			  r->cfg.timeout_ms, strerror(-rc));
	*out = r;
	return 0;
err:
	_free_all(r);
	return rc;
}

static bool _accepting(struct kvrt_remote *r)
{
	return !atomic_load_explicit(&r->closing, memory_order_acquire);
}

static int _post_req(struct kvrt_remote *r, struct _req *q)
{
	struct kvrt_msg m = {.type = _MSG_REQ};
	m.arg.ptr[0] = q;
	return kvrt_actor_try_post(r->actor, &m) ? 0 : -EAGAIN;
}

static struct _req *_user_req(struct kvrt_remote *r, enum _kind kind, struct kvrt_chunk_key key,
			      uint64_t cookie)
{
	struct _req *q = calloc(1, sizeof *q);
	if (!q)
		return NULL;
	q->kind = kind;
	q->key = key;
	q->cookie = cookie;
	kvrt_remote_key_name(r->cfg.namespace_hash, key, q->name);
	q->slot = kvrt_remote_key_slot(q->name, KVRT_REMOTE_KEY_LEN);
	q->deadline_ns = kvrt_now_ns() + r->timeout_ns;
	return q;
}

int kvrt_remote_write(struct kvrt_remote *r, const struct kvrt_chunk_header *h,
		      const void *payload, uint64_t cookie)
{
	if (!_accepting(r))
		return -ESHUTDOWN;
	if (!h || !payload || h->namespace_hash != r->cfg.namespace_hash || !h->num_tokens ||
	    h->payload_len != kvrt_chunk_payload_bytes(&h->shape, h->num_tokens) ||
	    !h->payload_len)
		return -EINVAL;
	if (_GET(r, nodes_up) == 0 && _GET(r, nodes) > 0) {
		_INC(r, dropped_down, 1);
		return -ENOTCONN;
	}
	uint32_t p = atomic_load_explicit(&r->pending_writes, memory_order_relaxed);
	do {
		if (p >= r->max_pending) {
			_INC(r, dropped_full, 1);
			return -EAGAIN;
		}
	} while (!atomic_compare_exchange_weak_explicit(&r->pending_writes, &p, p + 1,
							memory_order_relaxed, memory_order_relaxed));
	struct _req *q = _user_req(r, _K_WRITE, h->key, cookie);
	if (!q) {
		atomic_fetch_sub_explicit(&r->pending_writes, 1, memory_order_relaxed);
		return -ENOMEM;
	}
	q->h = *h;
	q->h.format_version = KVRT_CHUNK_FORMAT_VERSION;
	q->h.header_size = KVRT_CHUNK_HEADER_SIZE;
	q->h.flags = 0;
	q->payload = payload;
	int rc = _post_req(r, q);
	if (rc) {
		_INC(r, dropped_full, 1);
		atomic_fetch_sub_explicit(&r->pending_writes, 1, memory_order_relaxed);
		_req_free(q);
	}
	return rc;
}

int kvrt_remote_read(struct kvrt_remote *r, struct kvrt_chunk_key key, void *dst, uint64_t cap,
		     uint64_t cookie)
{
	if (!_accepting(r))
		return -ESHUTDOWN;
	struct _req *q = _user_req(r, _K_READ, key, cookie);
	if (!q)
		return -ENOMEM;
	q->dst = dst;
	q->cap = cap;
	int rc = _post_req(r, q);
	if (rc)
		_req_free(q);
	return rc;
}

int kvrt_remote_remove(struct kvrt_remote *r, struct kvrt_chunk_key key, uint64_t cookie)
{
	if (!_accepting(r))
		return -ESHUTDOWN;
	struct _req *q = _user_req(r, _K_DEL, key, cookie);
	if (!q)
		return -ENOMEM;
	int rc = _post_req(r, q);
	if (rc)
		_req_free(q);
	return rc;
}

int kvrt_remote_exists(struct kvrt_remote *r, const struct kvrt_chunk_key *keys, uint32_t n,
		       uint64_t cookie)
{
	if (!_accepting(r))
		return -ESHUTDOWN;
	if (!keys || n == 0 || n > KVRT_REMOTE_EXISTS_MAX)
		return -EINVAL;
	struct _batch *b = calloc(1, sizeof *b);
	struct _req **v = calloc(n, sizeof *v);
	if (!b || !v)
		goto nomem;
	b->present = calloc(n, 1);
	b->status = calloc(n, sizeof *b->status);
	if (!b->present || !b->status)
		goto nomem;
	b->cookie = cookie;
	b->first = keys[0];
	b->n = b->left = n;
	for (uint32_t i = 0; i < n; i++) {
		v[i] = _user_req(r, _K_EXISTS, keys[i], cookie);
		if (!v[i])
			goto nomem;
		v[i]->batch = b;
		v[i]->idx = i;
	}
	struct kvrt_msg m = {.type = _MSG_REQ, .arg32 = n};
	m.arg.ptr[0] = v[0];
	m.arg.ptr[1] = v;
	if (kvrt_actor_try_post(r->actor, &m))
		return 0;
	for (uint32_t i = 0; i < n; i++)
		_req_free(v[i]);
	free(v);
	free(b->present);
	free(b->status);
	free(b);
	return -EAGAIN;
nomem:
	if (v)
		for (uint32_t i = 0; i < n; i++)
			if (v[i])
				_req_free(v[i]);
	free(v);
	if (b) {
		free(b->present);
		free(b->status);
	}
	free(b);
	return -ENOMEM;
}

void kvrt_remote_stats(struct kvrt_remote *r, struct kvrt_remote_stats *o)
{
	*o = (struct kvrt_remote_stats){
		.writes = _GET(r, writes),
		.write_bytes = _GET(r, write_bytes),
		.reads = _GET(r, reads),
		.read_bytes = _GET(r, read_bytes),
		.misses = _GET(r, misses),
		.exists_batches = _GET(r, exists_batches),
		.exists_keys = _GET(r, exists_keys),
		.removes = _GET(r, removes),
		.dropped_full = _GET(r, dropped_full),
		.dropped_down = _GET(r, dropped_down),
		.err_timeout = _GET(r, err_timeout),
		.err_conn = _GET(r, err_conn),
		.err_corrupt = _GET(r, err_corrupt),
		.err_remote = _GET(r, err_remote),
		.moved = _GET(r, moved),
		.asked = _GET(r, asked),
		.refreshes = _GET(r, refreshes),
		.connects = _GET(r, connects),
		.disconnects = _GET(r, disconnects),
		.notify_delayed = _GET(r, notify_delayed),
		.notify_lost = _GET(r, notify_lost),
		.nodes = _GET(r, nodes),
		.nodes_up = _GET(r, nodes_up),
		.pending_writes = atomic_load_explicit(&r->pending_writes, memory_order_relaxed),
		.cluster = atomic_load_explicit(&r->c.cluster, memory_order_relaxed) != 0,
	};
}

void kvrt_remote_close(struct kvrt_remote *r)
{
	if (!r)
		return;
	/* release: a caller that sees closing also sees nothing else needed;
	 * posts racing with it are still handled before the actor stops. */
	atomic_store_explicit(&r->closing, true, memory_order_release);
	struct kvrt_completion c;
	kvrt_completion_init(&c);
	struct kvrt_msg m = {.type = _MSG_DRAIN};
	(void)kvrt_actor_call(r->actor, &m, &c, 1000000000ull);
	kvrt_actor_destroy(r->actor);
	_free_all(r);
}
