/* perf/perf.h: the kvrt-perf harness, as its suites see it.
 *
 * A suite measures kvrt next to a limit measured in the same run (memcpy,
 * raw ck_ring, the XXH3 floor, cudaMemcpy peak) and reports each figure with
 * kvrt_perf_fig(): the harness prints one table per suite and, with
 * --json FILE, writes every figure. Benchmarks report; they do not fail the
 * build: a missed target shows as "MISS" in the table.
 *
 * Add a suite: define `const struct kvrt_perf_suite kvrt_perf_suite_<name>`
 * in perf/suite_<name>.c, add the object to $perf_objs in your folder's
 * build.ninja fragment. perf/kvrt_perf.c already names every suite it knows
 * (weak references), so no shared file needs editing.
 */
#ifndef KVRT_PERF_H
#define KVRT_PERF_H

#include "runtime/common.h"

struct kvrt_perf;

struct kvrt_perf_suite {
	const char *name; /* command-line name: ring, store, kernels, ... */
	const char *what; /* one line for --help */
	/* Run; 0, or -errno when the suite could not run (it says why). */
	int (*run)(struct kvrt_perf *p);
};

enum kvrt_perf_better {
	KVRT_PERF_HIGHER = 0, /* throughput: ratio = value / limit, target is a minimum */
	KVRT_PERF_LOWER = 1,  /* latency: ratio = value / limit, target is a maximum */
};

struct kvrt_perf_figure {
	const char *name;       /* "mailbox 1 producer" */
	double value;           /* in unit */
	const char *unit;       /* "Mmsg/s", "GB/s", "us" */
	const char *limit_name; /* "raw ck_ring SPSC", or NULL when no limit */
	double limit;           /* same unit as value */
	double target;          /* ratio target; 0 = none */
	enum kvrt_perf_better better;
};

/* Report one figure (printed as a table row, kept for --json). */
void kvrt_perf_fig(struct kvrt_perf *p, const struct kvrt_perf_figure *f);

/* A note printed under the suite's table and kept in the JSON
 * ("LMCache not installed: skipped the side-by-side"). */
void kvrt_perf_note(struct kvrt_perf *p, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));

/* --quick: smaller sizes, for smoke runs. Suites should honour it. */
bool kvrt_perf_quick(const struct kvrt_perf *p);

/* A scale factor for iteration counts: 1.0 normally, smaller with --quick. */
double kvrt_perf_scale(const struct kvrt_perf *p);

/* Progress on stderr (a bar, only when stderr is a terminal or
 * KVRT_PROGRESS=1); call with done == total to finish the line. */
void kvrt_perf_progress(struct kvrt_perf *p, const char *what, uint64_t done, uint64_t total);

/* Value of --opt KEY=VALUE given on the command line, or def. */
const char *kvrt_perf_opt(const struct kvrt_perf *p, const char *key, const char *def);

/* Percentile q (0..100) of n doubles; sorts v in place. */
double kvrt_perf_percentile(double *v, size_t n, double q);

/* The CPU tier's put (take a slab, copy in, admit) and get (lookup with a
 * pin, copy out, unpin) of one chunk of `bytes` (`tokens` tokens) through
 * an 8-slab pool, median GB/s of the suite's reps (suite_store.c; the
 * lmcache suite uses it too). *refused: puts that waited for the ring.
 * 0, -ENOMEM, or -EIO (a get missed or returned other bytes). */
int kvrt_perf_cpu_put_get(struct kvrt_perf *p, size_t bytes, uint32_t tokens, double *put, double *get,
			  uint64_t *refused);

struct kvrt_index;
struct kvrt_chunk_key;
/* Insert keys[0..nk) and `filler` other entries (CPU tier, no slab) into
 * idx, with progress under `what`: a served cache is not empty
 * (suite_store.c; the lmcache suite uses it too). 0 or -ENOMEM. */
int kvrt_perf_index_fill(struct kvrt_perf *p, struct kvrt_index *idx, const struct kvrt_chunk_key *keys,
			 uint64_t nk, uint64_t filler, const char *what);

#endif
