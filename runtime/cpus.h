/* runtime/cpus.h: which CPUs kvrt's own threads run on.
 *
 * vLLM's CPU backend binds its OpenMP threads to cores (OMP_PLACES with
 * OMP_PROC_BIND, GOMP_CPU_AFFINITY, or KMP_AFFINITY's proclist, set in the
 * worker's environment) and leaves one or more cores to its scheduler
 * process. The worker's main thread is bound to the first OpenMP place, and
 * every thread it creates inherits that mask: kvrt's actors would share the
 * forward's core (slowing the forward, answering lookups late) while the
 * cores vLLM left free idle. Measured on 2 cores (kvrt-perf serve): every
 * kvrt thread on core 0 beside the forward's one OpenMP thread.
 *
 * Each thread kvrt starts calls kvrt_cpus_apply() on itself first:
 *   KVRT_CPUS=inherit    nothing: the creator's mask
 *   KVRT_CPUS=LIST       those CPUs ("1", "0,2-3"), within the allowed ones
 *   unset or auto        when the environment binds OpenMP to a list of CPUs
 *                        and the CPUs this process may use (the parent
 *                        process's mask: vLLM's worker is pinned, its engine
 *                        process is not; else every online CPU) include
 *                        others: those others; else nothing. Not when
 *                        VLLM_CPU_OMP_THREADS_BIND names the CPUs by hand
 *                        (the operator split the host, maybe between
 *                        servers: the other CPUs may be another forward's)
 * A mask that cannot be had (bad list, empty set, a failing syscall) leaves
 * the thread as it was, with one warning per process.
 *
 * Owns: the parsers and the process-wide choice (made once, on first use).
 * Threads: any; kvrt_cpus_apply() acts on the calling thread.
 */
#ifndef KVRT_RUNTIME_CPUS_H
#define KVRT_RUNTIME_CPUS_H

#include <sched.h> /* cpu_set_t: _GNU_SOURCE, as the build defines */
#include <stdbool.h>

/* Add the CPUs of an OpenMP-style list to out: numbers, ranges "a-b",
 * OpenMP intervals "{start:len[:stride]}", separated by ',' or spaces,
 * braces and brackets ignored. 0, or -EINVAL (anything else: abstract
 * places like "cores", numbers beyond CPU_SETSIZE). */
int kvrt_cpus_parse(const char *s, cpu_set_t *out);

/* The CPUs the environment binds OpenMP to (OMP_PLACES, GOMP_CPU_AFFINITY,
 * KMP_AFFINITY proclist=[...]): 0 and *out, or -ENOENT (none set or not a
 * list). */
int kvrt_cpus_openmp(cpu_set_t *out);

/* The mask kvrt's threads take (see above): 0 and *out, or -ENOENT (leave
 * them as created). Computed once per process. */
int kvrt_cpus_for_threads(cpu_set_t *out);

/* Bind the calling thread to kvrt_cpus_for_threads()'s mask, if any. */
void kvrt_cpus_apply(void);

/* Tests: forget the process-wide choice (the next call recomputes it). */
void _kvrt_cpus_reset(void);

#endif
