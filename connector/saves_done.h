/* connector/saves_done.h: a worker's saves-done step, shared with a
 * scheduler in another process.
 *
 * A request that saved KV is freed by vLLM with delay_free unless its saves
 * are known complete (kvrt_engine_saves_done: every save of steps <= that
 * step has copied out of vLLM's blocks). The scheduler decides at
 * request_finished. In the worker's own process it reads the engine; when
 * the workers live elsewhere (the lookup-socket case, connector/
 * lookup_socket.h) each rank publishes the value in a small file beside its
 * socket, rank<k>.saves (same directory, 0600), that the worker maps
 * read-write and the engine's save actor stores into; the scheduler maps
 * every rank's file read-only and takes the minimum. A rank whose file is
 * missing or not kvrt's counts as 0 (the request keeps delay_free: never
 * wrong, only slower to free).
 *
 * File: 4096 bytes: a u64 magic ("kvrtsav1", stored last, release) then the
 * step, a u64 the engine stores with release ordering (readers acquire).
 *
 * Lifetime: the worker creates the file at start (replacing a stale one),
 * unlinks it when it stops (before its socket, so the instance directory
 * goes with the last rank) and unmaps it after its engine is destroyed. A
 * killed worker's file is removed by the stale sweep of lookup_socket.c.
 *
 * Threads: a pub: create/unlink/close on its owner's thread; the slot is
 * stored by the save actor. A view: one thread at a time (the scheduler
 * serializes its calls).
 */
#ifndef KVRT_CONNECTOR_SAVES_DONE_H
#define KVRT_CONNECTOR_SAVES_DONE_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

struct kvrt_saves_pub;
struct kvrt_saves_view;

/* The file of the rank whose lookup socket is sock_path (".sock" -> ".saves").
 * 0, or -ENAMETOOLONG. */
int kvrt_saves_path(char *buf, size_t cap, const char *sock_path);

/* Worker: create path (0600, replacing what is there), map it; *slot is the
 * shared step (0). 0 or -errno. */
int kvrt_saves_pub_create(struct kvrt_saves_pub **out, const char *path, _Atomic uint64_t **slot);
/* Remove the file if it is still the one created (the mapping stays). */
void kvrt_saves_pub_unlink(struct kvrt_saves_pub *p);
/* Unmap and free (after the last store: the engine is destroyed). */
void kvrt_saves_pub_close(struct kvrt_saves_pub *p);

/* Scheduler: the files of n ranks (copied); mapped when first read. */
int kvrt_saves_view_create(struct kvrt_saves_view **out, const char *const *paths, uint32_t n);
/* The minimum over the ranks; 0 while any rank's file is missing or bad. */
uint64_t kvrt_saves_view_min(struct kvrt_saves_view *v);
void kvrt_saves_view_destroy(struct kvrt_saves_view *v);

#endif
