/* perf/kvrt_perf.c: kvrt-perf, kvrt's benchmark harness.
 *
 *   kvrt-perf [SUITE...] [--quick] [--json FILE] [--opt KEY=VALUE]... [--list]
 *   kvrt-perf serve [--quick] [--json FILE] [...]
 *
 * Runs the named suites (default: all that are built) and prints one table
 * per suite: each figure next to the limit measured in the same run, the
 * ratio, the target and whether it was met. Benchmarks report; the exit
 * status is 0 unless a suite could not run at all (missed targets show as
 * MISS, they are not errors: these machines are noisy).
 *
 * `serve` is not a C suite: it runs perf/serve_bench.py (vLLM's real
 * OpenAI server under a benchmark client) with the real-engine venv's
 * Python ($KVRT_ENGINE_PYTHON, else .venv-engine/bin/python of the tree
 * this binary was built in), handing it the other arguments.
 */
#include "perf/perf.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <limits.h>
#include <libgen.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

/* Suites are found through weak references: a suite not linked is NULL. */
#define SUITES(X) X(ring) X(store) X(disk) X(kernels) X(pipeline) X(e2e) X(remote) X(lmcache) X(soak)
#define DECLARE(n) extern const struct kvrt_perf_suite kvrt_perf_suite_##n __attribute__((weak));
SUITES(DECLARE)
#undef DECLARE

struct fig_rec {
	struct kvrt_perf_figure f;
	char name[96], unit[16], limit_name[64];
};

struct suite_rec {
	const char *name;
	struct fig_rec *figs;
	size_t nfigs, capfigs;
	char **notes;
	size_t nnotes;
	int status;
	double seconds;
};

struct kvrt_perf {
	bool quick;
	const char *json_path;
	const char **opts; /* KEY=VALUE strings */
	size_t nopts;
	struct suite_rec *suites;
	size_t nsuites;
	struct suite_rec *cur;
	bool progress_on;
	uint64_t progress_last_ns;
};

static const struct kvrt_perf_suite *find_suite(const char *name)
{
#define MATCH(n)                                                                         \
	if (!strcmp(name, #n))                                                          \
		return &kvrt_perf_suite_##n ? &kvrt_perf_suite_##n : NULL;
	SUITES(MATCH)
#undef MATCH
	return NULL;
}

static bool known_suite(const char *name)
{
#define KNOWN(n)                \
	if (!strcmp(name, #n)) \
		return true;
	SUITES(KNOWN)
#undef KNOWN
	return false;
}

static char *xstrdup(const char *s)
{
	char *d = strdup(s);
	if (!d) {
		fprintf(stderr, "kvrt-perf: out of memory\n");
		exit(2);
	}
	return d;
}

void kvrt_perf_fig(struct kvrt_perf *p, const struct kvrt_perf_figure *f)
{
	struct suite_rec *s = p->cur;
	if (s->nfigs == s->capfigs) {
		s->capfigs = s->capfigs ? 2 * s->capfigs : 16;
		s->figs = realloc(s->figs, s->capfigs * sizeof *s->figs);
		if (!s->figs) {
			fprintf(stderr, "kvrt-perf: out of memory\n");
			exit(2);
		}
		/* The records moved: re-point each figure at its own copies. */
		for (size_t i = 0; i < s->nfigs; i++) {
			struct fig_rec *o = &s->figs[i];
			o->f.name = o->name;
			o->f.unit = o->unit;
			o->f.limit_name = o->f.limit_name ? o->limit_name : NULL;
		}
	}
	struct fig_rec *r = &s->figs[s->nfigs++];
	r->f = *f;
	snprintf(r->name, sizeof r->name, "%s", f->name ? f->name : "?");
	snprintf(r->unit, sizeof r->unit, "%s", f->unit ? f->unit : "");
	snprintf(r->limit_name, sizeof r->limit_name, "%s", f->limit_name ? f->limit_name : "");
	r->f.name = r->name;
	r->f.unit = r->unit;
	r->f.limit_name = f->limit_name ? r->limit_name : NULL;
}

void kvrt_perf_note(struct kvrt_perf *p, const char *fmt, ...)
{
	struct suite_rec *s = p->cur;
	char buf[1024];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(buf, sizeof buf, fmt, ap);
	va_end(ap);
	s->notes = realloc(s->notes, (s->nnotes + 1) * sizeof *s->notes);
	if (!s->notes) {
		fprintf(stderr, "kvrt-perf: out of memory\n");
		exit(2);
	}
	s->notes[s->nnotes++] = xstrdup(buf);
}

bool kvrt_perf_quick(const struct kvrt_perf *p)
{
	return p->quick;
}

double kvrt_perf_scale(const struct kvrt_perf *p)
{
	return p->quick ? 0.1 : 1.0;
}

const char *kvrt_perf_opt(const struct kvrt_perf *p, const char *key, const char *def)
{
	size_t k = strlen(key);
	for (size_t i = 0; i < p->nopts; i++)
		if (!strncmp(p->opts[i], key, k) && p->opts[i][k] == '=')
			return p->opts[i] + k + 1;
	return def;
}

void kvrt_perf_progress(struct kvrt_perf *p, const char *what, uint64_t done, uint64_t total)
{
	if (!p->progress_on || total == 0)
		return;
	uint64_t now = kvrt_now_ns();
	if (done < total && now - p->progress_last_ns < 100000000u)
		return;
	p->progress_last_ns = now;
	int width = 30, fill = (int)((double)done / (double)total * width);
	fprintf(stderr, "\r  %-28.28s [", what);
	for (int i = 0; i < width; i++)
		fputc(i < fill ? '#' : '.', stderr);
	fprintf(stderr, "] %3d%%", (int)(100.0 * (double)done / (double)total));
	if (done >= total)
		fprintf(stderr, "\r%*s\r", 72, "");
	fflush(stderr);
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

double kvrt_perf_percentile(double *v, size_t n, double q)
{
	if (n == 0)
		return NAN;
	qsort(v, n, sizeof *v, cmp_double);
	double idx = q / 100.0 * (double)(n - 1);
	size_t lo = (size_t)idx;
	if (lo + 1 >= n)
		return v[n - 1];
	double frac = idx - (double)lo;
	return v[lo] * (1 - frac) + v[lo + 1] * frac;
}

static const char *verdict(const struct kvrt_perf_figure *f, double ratio)
{
	if (f->target <= 0 || !f->limit_name || !(f->limit > 0))
		return "";
	if (f->better == KVRT_PERF_HIGHER)
		return ratio >= f->target ? "ok" : "MISS";
	return ratio <= f->target ? "ok" : "MISS";
}

static double ratio_of(const struct kvrt_perf_figure *f)
{
	return f->limit_name && f->limit > 0 ? f->value / f->limit : NAN;
}

static void print_suite(const struct suite_rec *s)
{
	printf("\n== %s (%.1f s)\n", s->name, s->seconds);
	if (s->nfigs) {
		printf("%-40s %14s  %-26s %12s %7s %8s\n", "figure", "value", "limit", "limit value",
		       "ratio", "target");
		for (size_t i = 0; i < s->nfigs; i++) {
			const struct kvrt_perf_figure *f = &s->figs[i].f;
			char val[32], lim[32] = "", rat[16] = "", tgt[16] = "";
			snprintf(val, sizeof val, "%.4g %s", f->value, f->unit);
			double r = ratio_of(f);
			if (f->limit_name) {
				snprintf(lim, sizeof lim, "%.4g %s", f->limit, f->unit);
				snprintf(rat, sizeof rat, r < 0.1 ? "%.3fx" : "%.2fx", r);
			}
			if (f->target > 0)
				snprintf(tgt, sizeof tgt, f->target < 0.1 ? "%s%.3fx" : "%s%.2fx",
					 f->better == KVRT_PERF_HIGHER ? ">=" : "<=", f->target);
			printf("%-40.40s %14s  %-26.26s %12s %7s %8s %s\n", f->name, val,
			       f->limit_name ? f->limit_name : "-", lim, rat, tgt, verdict(f, r));
		}
	}
	for (size_t i = 0; i < s->nnotes; i++)
		printf("  note: %s\n", s->notes[i]);
	if (s->status != 0)
		printf("  suite could not run: %s\n", strerror(-s->status));
}

static void json_str(FILE *o, const char *s)
{
	fputc('"', o);
	for (; *s; s++) {
		unsigned char c = (unsigned char)*s;
		if (c == '"' || c == '\\')
			fprintf(o, "\\%c", c);
		else if (c < 0x20)
			fprintf(o, "\\u%04x", c);
		else
			fputc(c, o);
	}
	fputc('"', o);
}

static void json_num(FILE *o, double v)
{
	if (isfinite(v))
		fprintf(o, "%.6g", v);
	else
		fputs("null", o);
}

static int write_json(const struct kvrt_perf *p)
{
	char tmp[4096];
	snprintf(tmp, sizeof tmp, "%s.tmp", p->json_path);
	FILE *o = fopen(tmp, "w");
	if (!o)
		return -errno;
	struct utsname u;
	uname(&u);
	char date[64];
	time_t now = time(NULL);
	strftime(date, sizeof date, "%Y-%m-%dT%H:%M:%SZ", gmtime(&now));
	fprintf(o, "{\"tool\":\"kvrt-perf\",\"date\":\"%s\",\"machine\":{\"host\":", date);
	json_str(o, u.nodename);
	fprintf(o, ",\"kernel\":");
	json_str(o, u.release);
	fprintf(o, ",\"arch\":");
	json_str(o, u.machine);
	fprintf(o, ",\"cpus\":%ld},\"quick\":%s,\"suites\":{", sysconf(_SC_NPROCESSORS_ONLN),
		p->quick ? "true" : "false");
	for (size_t i = 0; i < p->nsuites; i++) {
		const struct suite_rec *s = &p->suites[i];
		fprintf(o, "%s", i ? "," : "");
		json_str(o, s->name);
		fprintf(o, ":{\"status\":%d,\"seconds\":%.3f,\"figures\":[", s->status, s->seconds);
		for (size_t j = 0; j < s->nfigs; j++) {
			const struct kvrt_perf_figure *f = &s->figs[j].f;
			fprintf(o, "%s{\"name\":", j ? "," : "");
			json_str(o, f->name);
			fprintf(o, ",\"value\":");
			json_num(o, f->value);
			fprintf(o, ",\"unit\":");
			json_str(o, f->unit);
			fprintf(o, ",\"limit_name\":");
			if (f->limit_name)
				json_str(o, f->limit_name);
			else
				fputs("null", o);
			fprintf(o, ",\"limit\":");
			json_num(o, f->limit_name ? f->limit : NAN);
			fprintf(o, ",\"ratio\":");
			json_num(o, ratio_of(f));
			fprintf(o, ",\"target\":");
			json_num(o, f->target > 0 ? f->target : NAN);
			fprintf(o, ",\"better\":\"%s\",\"met\":",
				f->better == KVRT_PERF_HIGHER ? "higher" : "lower");
			const char *v = verdict(f, ratio_of(f));
			fputs(*v ? (!strcmp(v, "ok") ? "true" : "false") : "null", o);
			fputc('}', o);
		}
		fprintf(o, "],\"notes\":[");
		for (size_t j = 0; j < s->nnotes; j++) {
			fprintf(o, "%s", j ? "," : "");
			json_str(o, s->notes[j]);
		}
		fprintf(o, "]}");
	}
	fprintf(o, "}}\n");
	if (fclose(o) != 0)
		return -errno;
	if (rename(tmp, p->json_path) != 0)
		return -errno;
	return 0;
}

static void usage(FILE *o)
{
	fprintf(o, "usage: kvrt-perf [SUITE...] [--quick] [--json FILE] [--opt KEY=VALUE]... [--list]\n"
		   "suites (default: all built):\n");
#define LIST(n)                                                                     \
	fprintf(o, "  %-9s %s\n", #n,                                               \
		&kvrt_perf_suite_##n ? kvrt_perf_suite_##n.what : "(not built yet)");
	SUITES(LIST)
#undef LIST
	fprintf(o, "  %-9s every suite above that is built\n", "all");
	fprintf(o, "  %-9s vLLM's real OpenAI server under a benchmark client, kvrt beside vLLM's own\n"
		   "  %-9s prefix cache and no connector (perf/serve_bench.py; its own options: serve --help)\n",
		"serve", "");
}

/* `kvrt-perf serve ...`: exec the Python driver; returns only on error. */
static int run_serve(int argc, char **argv)
{
	char exe[PATH_MAX], root[PATH_MAX], py[PATH_MAX + 32], script[PATH_MAX + 32];
	ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
	if (n <= 0) {
		perror("kvrt-perf: /proc/self/exe");
		return 2;
	}
	exe[n] = 0;
	/* <root>/build/<variant>/kvrt-perf */
	snprintf(root, sizeof root, "%s", dirname(dirname(dirname(exe))));
	const char *env = getenv("KVRT_ENGINE_PYTHON");
	snprintf(py, sizeof py, "%s", env && *env ? env : "");
	if (!*py)
		snprintf(py, sizeof py, "%s/.venv-engine/bin/python", root);
	snprintf(script, sizeof script, "%s/perf/serve_bench.py", root);
	if (access(py, X_OK) != 0) {
		fprintf(stderr, "kvrt-perf serve: %s missing; run ./configure (it prepares .venv-engine, "
				"vLLM's real CPU engine)\n", py);
		return 2;
	}
	char **av = calloc((size_t)argc + 2, sizeof *av);
	if (!av)
		return 2;
	av[0] = py;
	av[1] = script;
	for (int i = 2; i < argc; i++)
		av[i] = argv[i];
	fflush(stdout);
	execv(py, av);
	fprintf(stderr, "kvrt-perf serve: cannot run %s: %s\n", py, strerror(errno));
	free(av);
	return 2;
}

int main(int argc, char **argv)
{
	if (argc > 1 && !strcmp(argv[1], "serve"))
		return run_serve(argc, argv);
	struct kvrt_perf p = {0};
	const char **names = calloc((size_t)argc + 8, sizeof *names);
	p.opts = calloc((size_t)argc, sizeof *p.opts);
	size_t nnames = 0;
	if (!names || !p.opts)
		return 2;
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];
		if (!strcmp(a, "--quick")) {
			p.quick = true;
		} else if (!strcmp(a, "--json") && i + 1 < argc) {
			p.json_path = argv[++i];
		} else if (!strncmp(a, "--json=", 7)) {
			p.json_path = a + 7;
		} else if (!strcmp(a, "--opt") && i + 1 < argc && strchr(argv[i + 1], '=')) {
			p.opts[p.nopts++] = argv[++i];
		} else if (!strcmp(a, "--list") || !strcmp(a, "--help") || !strcmp(a, "-h")) {
			usage(stdout);
			return 0;
		} else if (!strcmp(a, "all")) {
			names[nnames++] = "all";
		} else if (a[0] != '-' && known_suite(a)) {
			names[nnames++] = a;
		} else {
			fprintf(stderr, "kvrt-perf: unknown argument '%s'\n", a);
			usage(stderr);
			return 2;
		}
	}
	const struct kvrt_perf_suite *run[16];
	size_t nrun = 0;
	bool all = nnames == 0;
	for (size_t i = 0; i < nnames; i++)
		all |= !strcmp(names[i], "all");
	if (all) {
#define ADD(n)                                       \
	if (&kvrt_perf_suite_##n)                   \
		run[nrun++] = &kvrt_perf_suite_##n;
		SUITES(ADD)
#undef ADD
	} else {
		for (size_t i = 0; i < nnames; i++) {
			const struct kvrt_perf_suite *s = find_suite(names[i]);
			if (!s) {
				fprintf(stderr, "kvrt-perf: suite '%s' is not built yet\n", names[i]);
				return 2;
			}
			run[nrun++] = s;
		}
	}
	const char *pe = getenv("KVRT_PROGRESS");
	p.progress_on = pe ? atoi(pe) != 0 : isatty(STDERR_FILENO);
	p.suites = calloc(nrun, sizeof *p.suites);
	if (!p.suites)
		return 2;

	struct utsname u;
	uname(&u);
	char date[64];
	time_t now = time(NULL);
	strftime(date, sizeof date, "%Y-%m-%d %H:%M UTC", gmtime(&now));
	printf("kvrt-perf on %s (%s %s, %ld cpus), %s%s\n", u.nodename, u.sysname, u.release,
	       sysconf(_SC_NPROCESSORS_ONLN), date, p.quick ? ", --quick" : "");
	printf("every figure is shown next to a limit measured in this same run\n");
	fflush(stdout);
	int failed = 0;
	for (size_t i = 0; i < nrun; i++) {
		struct suite_rec *s = &p.suites[p.nsuites++];
		s->name = run[i]->name;
		p.cur = s;
		if (p.progress_on)
			fprintf(stderr, "running %s...\n", s->name);
		uint64_t t0 = kvrt_now_ns();
		s->status = run[i]->run(&p);
		s->seconds = (double)(kvrt_now_ns() - t0) / 1e9;
		if (s->status != 0)
			failed++;
		print_suite(s);
		fflush(stdout);
	}
	int ret = failed ? 1 : 0;
	if (p.json_path) {
		int rc = write_json(&p);
		if (rc != 0) {
			fprintf(stderr, "kvrt-perf: cannot write %s: %s\n", p.json_path, strerror(-rc));
			ret = 1;
		} else {
			printf("\nwrote %s\n", p.json_path);
		}
	}
	/* Freed, so that LeakSanitizer (tests/check-soak.sh runs the ASan
	 * build) reports kvrt's leaks, not the harness's. */
	for (size_t i = 0; i < p.nsuites; i++) {
		for (size_t k = 0; k < p.suites[i].nnotes; k++)
			free(p.suites[i].notes[k]);
		free(p.suites[i].notes);
		free(p.suites[i].figs);
	}
	free(p.suites);
	free(p.opts);
	free(names);
	return ret;
}
