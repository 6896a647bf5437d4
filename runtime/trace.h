/* runtime/trace.h: the built-in tracer (Chrome trace JSON, opens in Perfetto).
 *
 * Off by default: every trace site is `if (KVRT_TRACING()) ...`, one
 * predictable branch on a global that stays 0. On when KVRT_TRACE=/path.json
 * is set (kvrt_trace_init_from_env) or kvrt_trace_start() is called.
 *
 * Each thread appends fixed-size records to its own single-producer buffer
 * (no lock, no allocation after the thread's first record); kvrt_trace_stop()
 * drains every buffer and writes the JSON: "X" slices with dur, "C" counters,
 * "s"/"f" flow arrows from a send to its handling, "M" thread names, and a
 * metadata note with the number of records dropped when a buffer was full.
 *
 * KVRT_TRACE may contain %p, replaced by the process id (one file per vLLM
 * process). KVRT_TRACE_BUFFER sets the records kept per thread (default
 * 262144, 32 bytes each, mapped lazily); when a thread's buffer is full its
 * further records are dropped and counted, never wrapped. A forked child
 * does not inherit tracing (its next actor re-reads KVRT_TRACE).
 *
 * Threads: every call is safe from any thread. Strings passed as names must
 * live until kvrt_trace_stop(): pass literals, or kvrt_trace_intern().
 */
#ifndef KVRT_RUNTIME_TRACE_H
#define KVRT_RUNTIME_TRACE_H

#include "runtime/common.h"

/* Internal: nonzero while tracing. Read through KVRT_TRACING() only. */
extern int _kvrt_trace_on;
#define KVRT_TRACING() KVRT_UNLIKELY(__atomic_load_n(&_kvrt_trace_on, __ATOMIC_RELAXED))

/* Start tracing into path (written at stop). 0, -EALREADY, -ENOMEM, -EINVAL. */
int kvrt_trace_start(const char *path);

/* Stop tracing, drain every thread's buffer and write the JSON file.
 * 0, -EINVAL (not tracing), or the write's -errno. */
int kvrt_trace_stop(void);

/* Once per process: if KVRT_TRACE is set, start tracing to it and stop (write)
 * at exit. Called by kvrt_actor_create; cheap after the first call. */
void kvrt_trace_init_from_env(void);

/* A copy of s that lives until the process exits (for names). */
const char *kvrt_trace_intern(const char *s);

/* Name the calling thread in the trace. */
void kvrt_trace_thread_name(const char *name);

/* A flow arrow starts here, now, on this thread ("s"). Returns its id (> 0). */
uint64_t kvrt_trace_flow_begin(const char *name);

/* A complete slice [start_ns, end_ns] (kvrt_now_ns clock) on this thread
 * ("X"); flow != 0 ends that flow arrow inside this slice ("f"). */
void kvrt_trace_slice(const char *name, uint64_t start_ns, uint64_t end_ns, uint64_t flow);

/* A counter sample, now ("C"). */
void kvrt_trace_counter(const char *name, int64_t value);

#endif
