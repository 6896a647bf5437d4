/* actors/remote.h: the remote tier, chunks in Redis or Redis Cluster, shared
 * by every kvrt engine (every vLLM instance, every host) pointed at it.
 *
 * Owns: the "remote" actor, its connections (one per Redis server: the
 * standalone server, or each cluster master), the cluster's slot table, and
 * every request in flight. No network I/O runs on the caller's thread.
 *
 *   struct kvrt_remote *r;
 *   rc = kvrt_remote_open(&r, &(struct kvrt_remote_config){
 *           .url = "redis://10.0.0.5:6379", .timeout_ms = 1000, .ttl_s = 3600,
 *           .namespace_hash = ns, .notify = evict_actor, .msg_base = EV_REMOTE });
 *   rc = kvrt_remote_write(r, &hdr, slab, cookie);      // -> KVRT_REMOTE_WRITTEN
 *   rc = kvrt_remote_read(r, key, slab, cap, cookie);   // -> KVRT_REMOTE_READ_DONE
 *   rc = kvrt_remote_exists(r, keys, n, cookie);        // -> KVRT_REMOTE_EXISTS_DONE
 *   rc = kvrt_remote_remove(r, key, cookie);            // -> KVRT_REMOTE_REMOVED
 *   kvrt_remote_close(r);                               // drains, then frees
 *
 * The shape is the disk tier's (actors/disk.h): asynchronous requests from
 * any thread, exactly one completion message per accepted request posted to
 * cfg->notify, type = msg_base + enum kvrt_remote_event, laid out as
 *     arg.u64[0], arg.u64[1]  key.lo, key.hi (EXISTS_DONE: the first key)
 *     arg.i64[2]              status: 0 or -errno (see each event)
 *     arg.u64[3]              the request's cookie
 *     arg.u64[4]              bytes: payload bytes written / read (0 on
 *                             failure); EXISTS_DONE: leading keys present
 *     arg32                   EXISTS_DONE: keys asked; READ_DONE with
 *                             status 0: the chunk's num_tokens; else 0
 * A full notify mailbox never loses a completion: undelivered ones wait in
 * order in a private backlog retried every 200 us (stats.notify_delayed);
 * only a notify actor that stopped, or stays full for 5 s at close, loses
 * them (stats.notify_lost, one kvrt_error).
 *
 * URL (remote_url)
 *   redis://[[user]:password@]host[:port][/db]   one server (port 6379, db 0)
 *   redis-cluster://host:port[,host:port...]     a Redis Cluster: seed nodes
 *   redis://host:port,host:port[,...]            the same (a list = cluster)
 *   rediss://...                                 refused: -EPROTONOSUPPORT
 *       (TLS needs hiredis >= 1.0 built with SSL; Debian 12's hiredis 0.14
 *       has none, so kvrt will not silently talk clear text instead)
 * user and password may be %XX-escaped; IPv6 hosts go in brackets. A bad URL
 * is -EINVAL with one kvrt_error naming what is wrong.
 *
 * Redis keys: "kvrt:1:<16 hex namespace>:<32 hex chunk key>", the chunk key
 * printed hi then lo (%016llx%016llx, as the disk tier names files), all
 * lowercase; 56 bytes. The same in every process, on every host. No hash
 * tag: cluster slots spread chunks over all masters.
 * Redis values: the 80-byte encoded chunk header (actors/chunk.h) followed by
 * the payload. A read checks the header (magic, version, sizes, key and
 * namespace equal to the request's, payload_len <= cap, value length =
 * 80 + payload_len) and the XXH3-64 checksum before a byte reaches dst: a
 * value that fails is -EBADMSG (never served) and is deleted from Redis.
 *
 * Cluster: CRC16 (XMODEM) hash slot of the key, with {hash tag} rules per the
 * Redis Cluster spec; the slot table comes from CLUSTER SLOTS at start, after
 * a MOVED (the moved slot is updated at once, the table refreshed soon) and
 * after a node's connection is lost. MOVED retries on the new owner, ASK
 * sends ASKING then the command to the named node once; at most 3 redirects
 * a request. A slot with no reachable owner is a miss / a dropped write.
 *
 * Timeouts and faults: every request has a deadline, timeout_ms after it was
 * accepted, enforced by an ev_timer on the actor's loop. A request past its
 * deadline on a connection means the server is stuck: that connection is
 * dropped, every request on it completes with -ETIMEDOUT, and it reconnects
 * with back-off (10 ms doubling to 1 s). A lost connection completes its
 * requests with -ECONNRESET; while a server is down, reads are -ENOTCONN
 * misses and writes are dropped (-ENOTCONN), both counted. Nothing waits
 * forever and nothing is retried behind the caller's back except cluster
 * redirects.
 *
 * I/O path: hiredis (0.14) async contexts on the actor's libev loop, with
 * kvrt's own event glue instead of <hiredis/adapters/libev.h> for two
 * reasons: hiredis 0.14 reads 16 KiB per loop iteration and copies every
 * command (a 32 MiB SET twice, plus a memmove per partial write). Here
 * commands are framed by kvrt (RESP) and written with sendmsg(MSG_NOSIGNAL)
 * straight from the caller's payload (zero copy, no SIGPIPE), and replies are
 * read in up to 1 MiB reads into hiredis' reader, whose bulk strings for GET
 * are checked and copied once into dst (a reader hook), not into a reply
 * object. hiredis parses replies and matches them to requests.
 *
 * Threads: open and close on one owner thread, never the remote actor's (and
 * never while holding up the notify actor: close waits for completions to be
 * delivered). write, read, exists and remove from any thread; stats from any
 * thread. open waits up to timeout_ms for the first connection (and the slot
 * table): an unreachable server is a warning, not an error (kvrt then runs
 * with misses and reconnects in the background); a refused password is an
 * error (-EACCES).
 */
#ifndef KVRT_ACTORS_REMOTE_H
#define KVRT_ACTORS_REMOTE_H

#include "actors/chunk.h"
#include "actors/redis_key.h"
#include "runtime/actor.h"

struct kvrt_remote;

/* Most keys in one kvrt_remote_exists batch. */
#define KVRT_REMOTE_EXISTS_MAX 4096u

/* Completion events; a message's type is cfg->msg_base + one of these. */
enum kvrt_remote_event {
	/* A write finished. status 0 (stored), -ENOTCONN (server down: dropped),
	 * -ETIMEDOUT, -ECONNRESET (connection lost: may or may not be stored),
	 * -EREMOTEIO (Redis answered an error, e.g. OOM: logged once),
	 * -EHOSTUNREACH (cluster: no owner for the slot). The payload may be
	 * reused once this arrives. */
	KVRT_REMOTE_WRITTEN = 0,
	/* A read finished. status 0: dst holds exactly payload_len (arg.u64[4])
	 * verified bytes. Nonzero: dst is garbage (untouched by kvrt, in fact);
	 * -ENOENT (not in Redis: a miss), -EBADMSG (corrupt or foreign value:
	 * not served, deleted), -EMSGSIZE (payload_len > cap), -ETIMEDOUT,
	 * -ENOTCONN, -ECONNRESET, -EREMOTEIO, -EHOSTUNREACH. All are misses. */
	KVRT_REMOTE_READ_DONE = 1,
	/* An exists batch finished: arg.u64[4] = how many leading keys exist
	 * (a lookup stops at the first missing chunk). status 0, or the first
	 * error met before the first missing key (then arg.u64[4] counts the
	 * keys known present before it). */
	KVRT_REMOTE_EXISTS_DONE = 2,
	/* A remove finished. status 0 (deleted; arg.u64[4] = 1) or 0 with
	 * arg.u64[4] = 0 (was not there), or an error as for WRITTEN. */
	KVRT_REMOTE_REMOVED = 3,
	KVRT_REMOTE_EVENT_COUNT = 4,
};

struct kvrt_remote_config {
	const char *url;             /* remote_url (see above; copied) */
	uint32_t timeout_ms;         /* per-request deadline; 0 = 1000 */
	uint32_t ttl_s;              /* expiry of written values; 0 = none */
	uint32_t max_pending_writes; /* writes accepted, not completed, before
				      * kvrt_remote_write says -EAGAIN; 0 = 16 */
	uint64_t namespace_hash;     /* keys and headers carry it */
	struct kvrt_actor *notify;   /* gets every completion (required) */
	uint32_t msg_base;           /* completion type = msg_base + event */
	uint32_t mailbox_size;       /* remote actor's mailbox (power of two); 0 = 1024 */
};

/* Counters; a racy snapshot (each field read atomically, not the set). */
struct kvrt_remote_stats {
	uint64_t writes;          /* writes stored (status 0) */
	uint64_t write_bytes;     /* their payload bytes */
	uint64_t reads;           /* reads served (status 0) */
	uint64_t read_bytes;      /* their payload bytes */
	uint64_t misses;          /* reads of keys not in Redis (-ENOENT) */
	uint64_t exists_batches;  /* exists batches completed */
	uint64_t exists_keys;     /* keys they asked about */
	uint64_t removes;         /* removes completed with status 0 */
	uint64_t dropped_full;    /* writes refused: max_pending_writes reached */
	uint64_t dropped_down;    /* writes dropped: server down / no slot owner */
	uint64_t err_timeout;     /* requests failed with -ETIMEDOUT */
	uint64_t err_conn;        /* requests failed: connection lost / refused */
	uint64_t err_corrupt;     /* reads of corrupt or foreign values */
	uint64_t err_remote;      /* Redis error replies (OOM, CLUSTERDOWN, ...) */
	uint64_t moved;           /* MOVED redirects followed */
	uint64_t asked;           /* ASK redirects followed */
	uint64_t refreshes;       /* cluster slot table refreshes */
	uint64_t connects;        /* connections established (first and re-) */
	uint64_t disconnects;     /* connections lost or dropped */
	uint64_t notify_delayed;  /* completions queued because notify was full */
	uint64_t notify_lost;     /* completions that could not be delivered */
	uint32_t nodes;           /* servers known (cluster: masters) */
	uint32_t nodes_up;        /* of which connected now */
	uint32_t pending_writes;  /* writes accepted, not completed */
	bool cluster;             /* Redis Cluster mode */
};

/* Parse cfg->url, start the "remote" actor, connect, and wait up to
 * timeout_ms for the first connection and slot table. Owner thread.
 * 0 (also when the server is unreachable: kvrt_warn, background reconnect),
 * -EINVAL (bad config or URL: one kvrt_error naming it), -EPROTONOSUPPORT
 * (rediss://), -EACCES (password refused), -ENOMEM, or the actor's error. */
int kvrt_remote_open(struct kvrt_remote **out, const struct kvrt_remote_config *cfg);

/* Queue a write of h's chunk (key, namespace = the config's, shape,
 * num_tokens; payload_len must equal the shape's bytes; the checksum is
 * computed by the actor, h->checksum is ignored). payload (payload_len bytes)
 * is sent from where it is, without a copy: it must stay valid and unchanged
 * until WRITTEN arrives. Any thread; never blocks. 0 (WRITTEN will come),
 * -EAGAIN (max_pending_writes in flight or mailbox full: dropped, counted),
 * -ENOTCONN (no server connected: dropped, counted), -EINVAL (bad header),
 * -ESHUTDOWN (closing), -ENOMEM. */
int kvrt_remote_write(struct kvrt_remote *r, const struct kvrt_chunk_header *h,
		      const void *payload, uint64_t cookie);

/* Queue a read of key's payload into dst (cap bytes). dst must stay valid
 * until READ_DONE and be treated as garbage unless its status is 0. Any
 * thread; never blocks. 0 (READ_DONE will come), -EAGAIN (mailbox full),
 * -ESHUTDOWN, -ENOMEM. */
int kvrt_remote_read(struct kvrt_remote *r, struct kvrt_chunk_key key, void *dst, uint64_t cap,
		     uint64_t cookie);

/* Queue a pipelined EXISTS of n keys (1..KVRT_REMOTE_EXISTS_MAX; copied, the
 * array may be reused at once). Any thread; never blocks. 0 (EXISTS_DONE
 * will come), -EINVAL (n), -EAGAIN, -ESHUTDOWN, -ENOMEM. */
int kvrt_remote_exists(struct kvrt_remote *r, const struct kvrt_chunk_key *keys, uint32_t n,
		       uint64_t cookie);

/* Queue a delete of key's value. Any thread; never blocks. 0 (REMOVED will
 * come), -EAGAIN, -ESHUTDOWN, -ENOMEM. */
int kvrt_remote_remove(struct kvrt_remote *r, struct kvrt_chunk_key key, uint64_t cookie);

void kvrt_remote_stats(struct kvrt_remote *r, struct kvrt_remote_stats *out);

/* Refuse new requests, wait (up to 2 x timeout_ms) for those in flight,
 * complete any left with -ECANCELED, deliver every completion, stop the
 * actor, free. Owner thread; NULL is ignored. */
void kvrt_remote_close(struct kvrt_remote *r);

#endif
