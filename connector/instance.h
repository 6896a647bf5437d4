/* connector/instance.h: internal to the connector's two handles of one
 * vLLM instance, connector/worker.c and connector/sched.c (callers use
 * connector/kvrt.h).
 *
 * Owns: this process's registry of worker engines by instance and rank (a
 * scheduler reads a worker of its own process directly, under the
 * registry's read lock; register and destroy take it for writing), the
 * option helpers both handles use (configuration, key namespaces, whether
 * lookups go over sockets), and the step frame's layout (sched.c writes
 * it in build_meta, worker.c reads it in bind).
 *
 * Step metadata bytes = a frame of kvrt's own around the codec's message:
 *
 *   "KVRS" | u32 version 1 | u32 meta_len | u32 nreq | meta_len bytes of a
 *   connector/meta.h message | 0-3 zero bytes to a multiple of 4 | nreq x
 *   (u64 id_hash | u64 ns_hash | u32 prompt_tokens | u32 ntok | ntok x u32
 *   token id)
 *
 * The request table carries what meta.h's message lacks and the engine
 * needs: each planned request's key namespace and its leading token ids (the
 * engine recomputes every key from them and checks the scheduler's).
 * Integers little-endian (the hosts vLLM runs on); read with memcpy.
 *
 * Threads: the registry: any thread (a process-wide rwlock); the helpers:
 * pure, any thread.
 */
#ifndef KVRT_CONNECTOR_INSTANCE_H
#define KVRT_CONNECTOR_INSTANCE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "actors/engine.h"
#include "connector/config.h"
#include "connector/kvrt.h"

#define _KVRT_FRAME_MAGIC "KVRS"
#define _KVRT_FRAME_HDR 16u

/* Enter worker engine e as instance's rank (tp, pp) (the instance string is
 * copied). 0, -EEXIST (that rank is taken in this process), -ENOMEM. */
int _kvrt_reg_add(const char *instance, uint32_t tp_rank, uint32_t pp_rank, struct kvrt_engine *e);
/* Take e out (waits for readers). No-op when e is not entered. */
void _kvrt_reg_remove(struct kvrt_engine *e);
/* Take the read lock and return instance's rank-0 engine in this process,
 * or NULL; pair with _kvrt_reg_unlock (the engine is valid until then). */
struct kvrt_engine *_kvrt_reg_rdlock(const char *instance);
/* Take the write lock (register keeps lookups out while it builds). */
void _kvrt_reg_wrlock(void);
void _kvrt_reg_unlock(void);

/* strdup of s, "" for NULL; NULL on -ENOMEM. */
char *_kvrt_dupstr(const char *s);
/* Config: defaults, file, environment, then o's keys, then checked. 0 or
 * -EINVAL (the message in err). */
int _kvrt_read_config(struct kvrt_config *c, const struct kvrt_options *o, char *err, size_t errlen);
/* The model's key namespace for a rank (the engine's, on disk and in Redis). */
uint64_t _kvrt_model_ns(const struct kvrt_options *o, uint32_t tp_rank, uint32_t pp_rank);
/* A request's key namespace: the model's plus everything of the request
 * that changes its KV. The scheduler keys rank 0 (TP = 1: see kvrt.h). */
uint64_t _kvrt_req_ns(const struct kvrt_options *o, const struct kvrt_request *r);
/* Whether lookups go over the ranks' sockets (see instance.c). */
bool _kvrt_lsock_wanted(const struct kvrt_options *o);

#endif
