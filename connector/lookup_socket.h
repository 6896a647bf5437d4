/* connector/lookup_socket.h: scheduler lookups across processes.
 *
 * With TP > 1 (vLLM's multiprocess executor) the scheduler (EngineCore)
 * and the workers live in different processes: the scheduler cannot read a
 * worker's index. Each worker engine then serves lookups on a Unix socket;
 * the scheduler asks every rank and takes the minimum (a chunk is loadable
 * only when every rank holds its slice of it).
 *
 * Owns: the wire codec, the server (one small actor "lookup-srv" per
 * worker, an ev_io listener and one ev_io per connection on its loop, which
 * calls kvrt_engine_lookup / kvrt_engine_release), the client (the
 * scheduler's connections, one per rank) and the socket paths.
 *
 * Socket path (kvrt_lsock_path): $XDG_RUNTIME_DIR/kvrt/<instance>/rank<k>.sock,
 * or /tmp/kvrt-<uid>/<instance>/rank<k>.sock without XDG_RUNTIME_DIR; k =
 * pp_rank * tp_size + tp_rank. <instance> is the instance string when it is
 * 1..64 of [A-Za-z0-9._-] (not starting with '.'), else "h" + 16 hex digits of
 * its hash. Directories are created 0700 and must be owned by this user
 * with no group/other access (else -EPERM: another user could swap the
 * socket); the socket is chmod'ed 0600 right after bind (the 0700 directory
 * keeps others out in between), and a connection from a process of another
 * user (SO_PEERCRED) is closed at once, counted, whatever the file modes
 * allow. A socket file left by a dead process
 * (connect refused) is replaced; one with a live server answers -EADDRINUSE.
 * The server unlinks its socket (if still its own) when stopped.
 *
 * Wire (integers little-endian, the hosts vLLM runs on):
 *   header   "KVLS" | u16 version (1) | u16 type | u32 payload bytes
 *   LOOKUP   u64 seq | u64 req_id | u64 ns_hash | u32 n | n x u32 token id
 *            (payload = 28 + 4n, n <= KVRT_LSOCK_MAX_TOKENS)
 *   RELEASE  u64 req_id (payload 8): release the request's lookup pins
 *   RESET    u64 seq (payload 8): drop the rank's cached chunks that no
 *            request uses (kvrt_engine_reset: vLLM's reset_prefix_cache
 *            with reset_external); answered with an ANSWER whose tokens
 *            field holds the chunks dropped and chunks the chunks kept
 *            (pinned), each clamped to u32
 *   ANSWER   u64 seq | i32 status | u32 tokens_now | u32 tokens |
 *            u32 chunks_now | u32 chunks (payload 28)
 * A frame with another magic, version or type, or whose length does not
 * match its type (or is beyond the cap), is malformed: the server counts
 * it and closes that connection (so does one that ends mid-frame); the
 * client treats a malformed answer as a failed rank. Nothing crashes.
 *
 * Threads: the codec and kvrt_lsock_path: any thread. The server: start and
 * stop on one owner thread; stats any thread. A client: one thread at a
 * time (the scheduler serializes its calls).
 */
#ifndef KVRT_CONNECTOR_LOOKUP_SOCKET_H
#define KVRT_CONNECTOR_LOOKUP_SOCKET_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "actors/engine.h"

#define KVRT_LSOCK_MAGIC "KVLS"
#define KVRT_LSOCK_VERSION 1u
#define KVRT_LSOCK_HDR 12u                 /* header bytes */
#define KVRT_LSOCK_MAX_TOKENS (1u << 20)   /* tokens per lookup (a 4 MiB frame) */
#define KVRT_LSOCK_ANSWER_BYTES (KVRT_LSOCK_HDR + 28u)
#define KVRT_LSOCK_RELEASE_BYTES (KVRT_LSOCK_HDR + 8u)

enum kvrt_lsock_type {
	KVRT_LSOCK_LOOKUP = 1,
	KVRT_LSOCK_RELEASE = 2,
	KVRT_LSOCK_ANSWER = 3,
	KVRT_LSOCK_RESET = 4,
};

/* A decoded frame (fields of its type; the rest 0). */
struct kvrt_lsock_frame {
	enum kvrt_lsock_type type;
	uint64_t seq;                   /* LOOKUP, RESET, ANSWER: matches an answer to its call */
	uint64_t req_id;                /* LOOKUP, RELEASE: the pin owner */
	uint64_t ns_hash;               /* LOOKUP: the request's key namespace */
	uint32_t num_tokens;            /* LOOKUP */
	const uint8_t *tokens;          /* LOOKUP: num_tokens LE u32, into the buffer
					 * (not aligned: copy them out) */
	int32_t status;                 /* ANSWER: the engine's lookup rc (0 or -errno) */
	struct kvrt_lookup_result res;  /* ANSWER */
};

/* Encoders: the frame's bytes, or 0 when it does not fit in cap (or n is
 * beyond KVRT_LSOCK_MAX_TOKENS). */
size_t kvrt_lsock_encode_lookup(uint8_t *buf, size_t cap, uint64_t seq, uint64_t req_id,
				uint64_t ns_hash, const uint32_t *tokens, uint32_t n);
size_t kvrt_lsock_encode_release(uint8_t *buf, size_t cap, uint64_t req_id);
size_t kvrt_lsock_encode_reset(uint8_t *buf, size_t cap, uint64_t seq);
size_t kvrt_lsock_encode_answer(uint8_t *buf, size_t cap, uint64_t seq, int32_t status,
				const struct kvrt_lookup_result *res);

/* The size of the frame that starts buf (have bytes received so far), from
 * its header: 0 and *total, -EAGAIN (fewer than KVRT_LSOCK_HDR bytes), or
 * -EBADMSG (bad magic, version, type, or a length its type forbids). */
int kvrt_lsock_frame_size(const uint8_t *buf, size_t have, size_t *total);

/* Decode exactly one whole frame of len bytes. 0 or -EBADMSG (malformed,
 * truncated or with bytes beyond it). */
int kvrt_lsock_decode(const uint8_t *buf, size_t len, struct kvrt_lsock_frame *f);

/* The socket path of instance/rank into buf (see above); make_dirs creates
 * (and checks) its directories. 0, -ENAMETOOLONG (beyond a sockaddr_un),
 * -EPERM (a directory that is not ours or is open to others), or mkdir's
 * -errno. */
int kvrt_lsock_path(char *buf, size_t cap, const char *instance, uint32_t rank, bool make_dirs);

/* --- server (worker side) ------------------------------------------------- */

struct kvrt_lsock_server;

struct kvrt_lsock_server_stats {
	uint64_t accepted;    /* connections accepted */
	uint64_t refused;     /* connections closed at once: too many open */
	uint64_t lookups;     /* lookups answered */
	uint64_t releases;    /* releases done */
	uint64_t resets;      /* resets done */
	uint64_t malformed;   /* connections closed for a malformed or truncated frame */
	uint64_t write_failed; /* connections closed because an answer could not be sent */
	uint64_t foreign;     /* connections closed at once: a peer of another user */
};

/* Listen on path (its directory must exist: kvrt_lsock_path(.., true)) and
 * answer lookups from engine e, which must be registered and outlive the
 * server. 0, -EADDRINUSE (a live server holds path), -EEXIST (path is not
 * a socket), -ENAMETOOLONG, -ENOMEM, or the socket calls' -errno. */
int kvrt_lsock_server_start(struct kvrt_lsock_server **out, struct kvrt_engine *e, const char *path);

/* Stop answering, close every connection, unlink the socket. NULL ignored. */
void kvrt_lsock_server_stop(struct kvrt_lsock_server *s);

void kvrt_lsock_server_stats(struct kvrt_lsock_server *s, struct kvrt_lsock_server_stats *out);

/* --- client (scheduler side) ---------------------------------------------- */

struct kvrt_lsock_client;

/* A client of n ranks at paths[0..n) (copied), answering within
 * timeout_ms. Connects lazily. 0, -EINVAL (n 0 or a path too long), -ENOMEM. */
int kvrt_lsock_client_create(struct kvrt_lsock_client **out, const char *const *paths, uint32_t n,
			     uint32_t timeout_ms);
void kvrt_lsock_client_destroy(struct kvrt_lsock_client *c);

/* Ask every rank; *out = the minimum of each field over the ranks. A rank
 * that cannot be reached, answers late (after timeout_ms from the call),
 * malformed, or with an error makes the whole answer "no hit": *out zeroed
 * and -EHOSTDOWN (or -ENOMEM / -EINVAL for n > KVRT_LSOCK_MAX_TOKENS). A
 * rank that timed out is not asked again for KVRT_LSOCK_BACKOFF_MS (its
 * lookups answer no hit at once); a refused connection is retried at the
 * next call. Each rank's up/down change is logged once. Never blocks
 * longer than timeout_ms. 0 when every rank answered; -EINPROGRESS when
 * some rank answered that (it asked Redis: ask again later, *out zeroed). */
int kvrt_lsock_client_lookup(struct kvrt_lsock_client *c, uint64_t req_id, uint64_t ns_hash,
			     const uint32_t *tokens, uint32_t n, struct kvrt_lookup_result *out);

/* Tell every connected rank to release req_id's pins; never waits (a rank
 * that cannot take it now keeps them until pin_timeout_ms). */
void kvrt_lsock_client_release(struct kvrt_lsock_client *c, uint64_t req_id);

/* Reset every rank's cache (RESET frames, answers awaited up to timeout_ms:
 * a reset may retire many chunks). *dropped / *kept (NULL ok): chunks over
 * all ranks. 0, or -EHOSTDOWN when a rank did not answer or failed. */
int kvrt_lsock_client_reset(struct kvrt_lsock_client *c, uint32_t timeout_ms, uint64_t *dropped,
			    uint64_t *kept);

#define KVRT_LSOCK_BACKOFF_MS 5000u

#endif
