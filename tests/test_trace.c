/* tests/test_trace.c: the tracer (runtime/trace.h).
 *
 * Under Criterion each test runs in its own process; under the TSan build's
 * stand-in runner (tests/tsan-runner) they all run in one, one after another,
 * so each test starts with fresh_start() and leaves tracing stopped. The
 * files are checked as a user's viewer would read them: the whole file must
 * be valid JSON (a strict validator below), and every record written must be
 * in it exactly once, or be counted as dropped.
 */
#include <criterion/criterion.h>

#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "runtime/trace.h"
#include "tests/test_util.h"

/* ---- helpers -------------------------------------------------------- */

/* Default buffer size, tracing off (as a previous test left it). */
static void fresh_start(void)
{
	unsetenv("KVRT_TRACE_BUFFER");
	cr_assert_eq(kvrt_trace_stop(), -EINVAL, "a previous test left tracing on");
	cr_assert_eq(_kvrt_trace_on, 0);
}

static char *tmp_path(const char *tag)
{
	static int n;
	char *p = malloc(256);
	cr_assert_not_null(p);
	snprintf(p, 256, "/tmp/kvrt-test-trace-%d-%d-%s.json", (int)getpid(), n++, tag);
	unlink(p);
	return p;
}

static char *read_file(const char *path)
{
	FILE *f = fopen(path, "rb");
	cr_assert_not_null(f, "%s not written: %s", path, strerror(errno));
	fseek(f, 0, SEEK_END);
	long len = ftell(f);
	fseek(f, 0, SEEK_SET);
	char *s = malloc((size_t)len + 1);
	cr_assert_not_null(s);
	cr_assert_eq(fread(s, 1, (size_t)len, f), (size_t)len);
	s[len] = 0;
	fclose(f);
	return s;
}

static bool exists(const char *path)
{
	struct stat st;
	return stat(path, &st) == 0;
}

/* Strict JSON (RFC 8259) validator: returns the end of the value or NULL. */
static const char *j_ws(const char *p)
{
	while (*p == ' ' || *p == '\n' || *p == '\t' || *p == '\r')
		p++;
	return p;
}

static const char *j_value(const char *p, int depth);

static const char *j_string(const char *p)
{
	if (*p++ != '"')
		return NULL;
	for (;;) {
		unsigned char c = (unsigned char)*p;
		if (c == '"')
			return p + 1;
		if (c < 0x20)
			return NULL; /* raw control character (or end of file) */
		if (c == '\\') {
			p++;
			if (*p == 'u') {
				for (int i = 1; i <= 4; i++)
					if (!isxdigit((unsigned char)p[i]))
						return NULL;
				p += 5;
			} else if (*p == '"' || *p == '\\' || *p == '/' || *p == 'b' || *p == 'f' ||
				   *p == 'n' || *p == 'r' || *p == 't') {
				p++;
			} else {
				return NULL;
			}
			continue;
		}
		if (c < 0x80) {
			p++;
			continue;
		}
		/* UTF-8: lead byte and continuation bytes. */
		int n = c >= 0xf0 && c <= 0xf4 ? 4 : c >= 0xe0 ? 3 : c >= 0xc2 && c <= 0xdf ? 2 : 0;
		if (!n || c > 0xf4)
			return NULL;
		for (int i = 1; i < n; i++)
			if (((unsigned char)p[i] & 0xc0) != 0x80)
				return NULL;
		p += n;
	}
}

static const char *j_number(const char *p)
{
	const char *s = p;
	if (*p == '-')
		p++;
	if (*p == '0')
		p++;
	else if (*p >= '1' && *p <= '9')
		while (*p >= '0' && *p <= '9')
			p++;
	else
		return NULL;
	if (*p == '.') {
		p++;
		if (!(*p >= '0' && *p <= '9'))
			return NULL;
		while (*p >= '0' && *p <= '9')
			p++;
	}
	if (*p == 'e' || *p == 'E') {
		p++;
		if (*p == '+' || *p == '-')
			p++;
		if (!(*p >= '0' && *p <= '9'))
			return NULL;
		while (*p >= '0' && *p <= '9')
			p++;
	}
	return p > s ? p : NULL;
}

static const char *j_value(const char *p, int depth)
{
	if (depth > 64)
		return NULL;
	p = j_ws(p);
	if (*p == '{' || *p == '[') {
		char close = *p == '{' ? '}' : ']';
		bool obj = *p == '{';
		p = j_ws(p + 1);
		if (*p == close)
			return p + 1;
		for (;;) {
			if (obj) {
				p = j_string(j_ws(p));
				if (!p)
					return NULL;
				p = j_ws(p);
				if (*p++ != ':')
					return NULL;
			}
			p = j_value(p, depth + 1);
			if (!p)
				return NULL;
			p = j_ws(p);
			if (*p == ',') {
				p++;
				continue;
			}
			if (*p == close)
				return p + 1;
			return NULL;
		}
	}
	if (*p == '"')
		return j_string(p);
	for (const char *const *lit = (const char *const[]){"true", "false", "null", NULL}; *lit; lit++) {
		/* Not strncmp: under ASan's strict_string_checks it measures
		 * the whole rest of the document each time. */
		size_t i = 0;
		while ((*lit)[i] && p[i] == (*lit)[i])
			i++;
		if (!(*lit)[i])
			return p + i;
	}
	return j_number(p);
}

static void assert_json(const char *doc)
{
	const char *end = j_value(doc, 0);
	cr_assert_not_null(end, "the trace is not valid JSON");
	cr_assert_eq(*j_ws(end), 0, "trailing bytes after the JSON document");
}

/* The first needle[0..len) in [p, end), or NULL. A plain loop: ASan's
 * strstr/memmem/strtoull check the whole rest of the document on every call,
 * which makes scanning a 10 MB trace quadratic. */
static const char *find(const char *p, const char *end, const char *needle, size_t len)
{
	for (; p + len <= end; p++) {
		if (*p != needle[0])
			continue;
		size_t i = 1;
		while (i < len && p[i] == needle[i])
			i++;
		if (i == len)
			return p;
	}
	return NULL;
}

/* Occurrences of needle in doc. */
static size_t count(const char *doc, const char *needle)
{
	size_t n = 0, len = strlen(needle);
	const char *end = doc + strlen(doc);
	for (const char *p = find(doc, end, needle, len); p; p = find(p + len, end, needle, len))
		n++;
	return n;
}

/* The unsigned number after `key` (e.g. "\"dropped_records\":"). */
static uint64_t number_after(const char *doc, const char *key)
{
	const char *p = strstr(doc, key);
	cr_assert_not_null(p, "%s missing", key);
	return strtoull(p + strlen(key), NULL, 10);
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return x < y ? -1 : x > y;
}

/* The "id" of every event with phase ph (one event per line), sorted. */
static uint64_t *flow_ids(const char *doc, char ph, size_t *n)
{
	char needle[16];
	snprintf(needle, sizeof needle, "\"ph\":\"%c\"", ph);
	size_t cap = count(doc, needle) + 1, k = 0, len = strlen(needle);
	uint64_t *ids = malloc(cap * sizeof *ids);
	cr_assert_not_null(ids);
	const char *end = doc + strlen(doc);
	for (const char *p = find(doc, end, needle, len); p; p = find(p + len, end, needle, len)) {
		const char *eol = find(p, end, "\n", 1);
		if (!eol)
			eol = end;
		const char *id = find(p, eol, "\"id\":", 5);
		cr_assert_not_null(id, "flow event without an id");
		uint64_t v = 0; /* not strtoull: see find() */
		for (const char *q = id + 5; *q >= '0' && *q <= '9'; q++)
			v = v * 10 + (uint64_t)(*q - '0');
		ids[k++] = v;
	}
	qsort(ids, k, sizeof *ids, cmp_u64);
	*n = k;
	return ids;
}

/* ---- off by default ------------------------------------------------- */

Test(trace, off_by_default)
{
	/* (KVRT_TRACE unset -> off is checked by tests/check-trace.sh: the
	 * once-per-process init is init_from_env's to use here.) */
	fresh_start();
	char dir[] = "/tmp/kvrt-test-trace-off-XXXXXX", cwd[4096];
	cr_assert_not_null(getcwd(cwd, sizeof cwd));
	cr_assert_not_null(mkdtemp(dir));
	cr_assert_eq(chdir(dir), 0);
	cr_assert(!KVRT_TRACING());
	uint64_t a = kvrt_trace_flow_begin("x"), b = kvrt_trace_flow_begin("x");
	cr_assert(a > 0 && b > 0 && a != b, "flow ids are unique and nonzero");
	kvrt_trace_slice("s", 1, 2, a);
	kvrt_trace_counter("c", 3);
	kvrt_trace_thread_name("main");
	cr_assert_eq(kvrt_trace_stop(), -EINVAL);
	DIR *d = opendir(".");
	cr_assert_not_null(d);
	struct dirent *e;
	int files = 0;
	while ((e = readdir(d)))
		files += strcmp(e->d_name, ".") && strcmp(e->d_name, "..");
	closedir(d);
	cr_assert_eq(files, 0, "nothing may be written while tracing is off");
	cr_assert_eq(chdir(cwd), 0);
	rmdir(dir);
}

Test(trace, api_errors)
{
	fresh_start();
	cr_assert_eq(kvrt_trace_start(NULL), -EINVAL);
	cr_assert_eq(kvrt_trace_start(""), -EINVAL);
	char *p = tmp_path("api");
	cr_assert_eq(kvrt_trace_start(p), 0);
	cr_assert_neq(_kvrt_trace_on, 0);
	cr_assert_eq(kvrt_trace_start(p), -EALREADY);
	cr_assert_eq(kvrt_trace_stop(), 0);
	cr_assert_eq(_kvrt_trace_on, 0);
	cr_assert_eq(kvrt_trace_stop(), -EINVAL);
	char tmp[300];
	snprintf(tmp, sizeof tmp, "%s.tmp", p);
	cr_assert(exists(p));
	cr_assert(!exists(tmp), "the temporary file is renamed into place");
	char *doc = read_file(p);
	assert_json(doc);
	cr_assert_eq(count(doc, "\"process_name\""), 1);
	cr_assert_eq(number_after(doc, "\"dropped_records\":"), 0);
	free(doc);
	unlink(p);
	free(p);
}

Test(trace, init_from_env)
{
	fresh_start();
	char *p = tmp_path("env");
	setenv("KVRT_TRACE", p, 1);
	kvrt_trace_init_from_env();
	cr_assert(KVRT_TRACING());
	kvrt_trace_slice("from-env", kvrt_now_ns(), kvrt_now_ns() + 10, 0);
	kvrt_trace_init_from_env(); /* once per process: no restart */
	cr_assert_eq(kvrt_trace_stop(), 0);
	char *doc = read_file(p);
	assert_json(doc);
	cr_assert_eq(count(doc, "\"from-env\""), 1);
	unsetenv("KVRT_TRACE");
	free(doc);
	unlink(p);
	free(p);
}

/* ---- concurrent writers --------------------------------------------- */

struct worker {
	pthread_t th;
	int idx;
	uint64_t n;       /* iterations */
	uint64_t slices;  /* records written, by kind */
	uint64_t counters;
	uint64_t flows;
};

static void *worker_main(void *arg)
{
	struct worker *w = arg;
	char name[32];
	snprintf(name, sizeof name, "worker-%d", w->idx);
	kvrt_trace_thread_name(name); /* interned: the buffer dies here */
	uint64_t rnd = 0x9e3779b97f4a7c15u * (uint64_t)(w->idx + 1);
	for (uint64_t j = 0; j < w->n; j++) {
		uint64_t t0 = kvrt_now_ns();
		kvrt_trace_counter("work.depth", (int64_t)(kvrt_test_rand(&rnd) % 1000));
		w->counters++;
		uint64_t f = kvrt_trace_flow_begin("hop");
		w->flows++;
		kvrt_trace_slice(j & 1 ? "odd" : "even", t0, kvrt_now_ns(), f);
		w->slices++;
	}
	return NULL;
}

Test(trace, concurrent_writers_all_records_written)
{
	fresh_start();
	enum { T = 4 };
	uint64_t n = kvrt_test_scaled(20000, 500);
	char *p = tmp_path("conc");
	cr_assert_eq(kvrt_trace_start(p), 0);
	struct worker w[T];
	memset(w, 0, sizeof w);
	for (int i = 0; i < T; i++) {
		w[i].idx = i;
		w[i].n = n;
		cr_assert_eq(pthread_create(&w[i].th, NULL, worker_main, &w[i]), 0);
	}
	/* The threads exit before the drain: their records must survive. */
	for (int i = 0; i < T; i++)
		pthread_join(w[i].th, NULL);
	cr_assert_eq(kvrt_trace_stop(), 0);

	char *doc = read_file(p);
	assert_json(doc);
	uint64_t slices = 0, counters = 0, flows = 0;
	for (int i = 0; i < T; i++) {
		slices += w[i].slices;
		counters += w[i].counters;
		flows += w[i].flows;
		char tn[64];
		snprintf(tn, sizeof tn, "\"args\":{\"name\":\"worker-%d\"}", i);
		cr_assert_eq(count(doc, tn), 1, "thread name worker-%d", i);
	}
	cr_assert_eq(count(doc, "\"name\":\"thread_name\""), T);
	cr_assert_eq(count(doc, "\"name\":\"process_name\""), 1);
	cr_assert_eq(count(doc, "\"ph\":\"X\",\"ts\""), slices + flows, "one X per slice and per post");
	cr_assert_eq(count(doc, "\"cat\":\"kvrt.post\""), flows);
	cr_assert_eq(count(doc, "\"ph\":\"C\""), counters);
	cr_assert_eq(count(doc, "\"ph\":\"s\""), flows);
	cr_assert_eq(count(doc, "\"ph\":\"f\""), flows);
	cr_assert_eq(count(doc, "\"bp\":\"e\""), flows);
	cr_assert_eq(number_after(doc, "\"records\":"), slices + counters + flows);
	cr_assert_eq(number_after(doc, "\"dropped_records\":"), 0);
	/* Every arrow has both ends, each id exactly once. */
	size_t ns, nf;
	uint64_t *s = flow_ids(doc, 's', &ns), *f = flow_ids(doc, 'f', &nf);
	cr_assert_eq(ns, nf);
	for (size_t i = 0; i < ns; i++) {
		cr_assert_eq(s[i], f[i], "flow %zu: start id %lu, end id %lu", i,
			     (unsigned long)s[i], (unsigned long)f[i]);
		cr_assert(i == 0 || s[i] != s[i - 1], "flow ids are unique");
	}
	free(s);
	free(f);
	free(doc);
	unlink(p);
	free(p);
}

/* ---- overflow ------------------------------------------------------- */

struct filler {
	pthread_t th;
	int records; /* counters to write */
};

static void *filler_main(void *arg)
{
	struct filler *f = arg;
	for (int i = 0; i < f->records; i++)
		kvrt_trace_counter("fill", i);
	return NULL;
}

Test(trace, overflow_reports_exact_drops)
{
	fresh_start();
	setenv("KVRT_TRACE_BUFFER", "100", 1);
	char *p = tmp_path("ovf");
	cr_assert_eq(kvrt_trace_start(p), 0);
	struct filler f[2] = {{.records = 250}, {.records = 90}};
	for (int i = 0; i < 2; i++)
		cr_assert_eq(pthread_create(&f[i].th, NULL, filler_main, &f[i]), 0);
	for (int i = 0; i < 2; i++)
		pthread_join(f[i].th, NULL);
	cr_assert_eq(kvrt_trace_stop(), 0);
	char *doc = read_file(p);
	assert_json(doc);
	cr_assert_eq(number_after(doc, "\"dropped_records\":"), 150);
	cr_assert_eq(count(doc, "\"ph\":\"C\""), 100 + 90, "a full buffer keeps its first records");
	cr_assert_eq(count(doc, "\"name\":\"kvrt_dropped_records\""), 1, "only the full thread");
	cr_assert_eq(number_after(doc, "\"args\":{\"dropped\":"), 150);
	cr_assert_eq(count(doc, "trace records dropped"), 1, "a visible note in the timeline");
	free(doc);
	unlink(p);
	free(p);
}

/* ---- sessions ------------------------------------------------------- */

Test(trace, restart_keeps_sessions_apart)
{
	fresh_start();
	char *p1 = tmp_path("s1"), *p2 = tmp_path("s2");
	cr_assert_eq(kvrt_trace_start(p1), 0);
	for (int i = 0; i < 10; i++)
		kvrt_trace_slice("one", kvrt_now_ns(), kvrt_now_ns(), 0);
	cr_assert_eq(kvrt_trace_stop(), 0);
	kvrt_trace_slice("between", kvrt_now_ns(), kvrt_now_ns(), 0);
	/* A new capacity for the same thread: its buffer is replaced. */
	setenv("KVRT_TRACE_BUFFER", "3", 1);
	cr_assert_eq(kvrt_trace_start(p2), 0);
	for (int i = 0; i < 5; i++)
		kvrt_trace_slice("two", kvrt_now_ns(), kvrt_now_ns(), 0);
	cr_assert_eq(kvrt_trace_stop(), 0);

	char *d1 = read_file(p1), *d2 = read_file(p2);
	assert_json(d1);
	assert_json(d2);
	cr_assert_eq(count(d1, "\"one\""), 10);
	cr_assert_eq(count(d1, "\"two\""), 0);
	cr_assert_eq(count(d2, "\"one\""), 0, "a new session starts empty");
	cr_assert_eq(count(d2, "\"between\""), 0, "nothing is recorded while off");
	cr_assert_eq(count(d2, "\"two\""), 3);
	cr_assert_eq(number_after(d2, "\"dropped_records\":"), 2);
	free(d1);
	free(d2);
	unlink(p1);
	unlink(p2);
	free(p1);
	free(p2);
}

static void *named_writer(void *arg)
{
	const char *name = arg;
	kvrt_trace_thread_name(name);
	for (int i = 0; i < 7; i++)
		kvrt_trace_slice(name, kvrt_now_ns(), kvrt_now_ns(), 0);
	return NULL;
}

Test(trace, exited_threads_records_survive_and_buffers_are_reused)
{
	fresh_start();
	char *p1 = tmp_path("x1"), *p2 = tmp_path("x2");
	pthread_t th;
	cr_assert_eq(kvrt_trace_start(p1), 0);
	cr_assert_eq(pthread_create(&th, NULL, named_writer, "gone-before-drain"), 0);
	pthread_join(th, NULL);
	cr_assert_eq(kvrt_trace_stop(), 0);
	cr_assert_eq(kvrt_trace_start(p2), 0);
	cr_assert_eq(pthread_create(&th, NULL, named_writer, "second"), 0);
	pthread_join(th, NULL);
	cr_assert_eq(kvrt_trace_stop(), 0);

	char *d1 = read_file(p1), *d2 = read_file(p2);
	assert_json(d1);
	assert_json(d2);
	cr_assert_eq(count(d1, "\"name\":\"gone-before-drain\",\"cat\""), 7);
	cr_assert_eq(count(d1, "\"args\":{\"name\":\"gone-before-drain\"}"), 1);
	cr_assert_eq(count(d2, "\"name\":\"second\",\"cat\""), 7);
	cr_assert_eq(count(d2, "gone-before-drain"), 0, "a reused buffer starts clean");
	cr_assert_eq(count(d2, "\"args\":{\"name\":\"second\"}"), 1);
	free(d1);
	free(d2);
	unlink(p1);
	unlink(p2);
	free(p1);
	free(p2);
}

/* ---- stop while others write ---------------------------------------- */

static atomic_int keep_writing;

static void *busy_writer(void *arg)
{
	(void)arg;
	kvrt_trace_thread_name("busy");
	while (atomic_load_explicit(&keep_writing, memory_order_relaxed)) {
		uint64_t t0 = kvrt_now_ns();
		uint64_t f = KVRT_TRACING() ? kvrt_trace_flow_begin("busy") : 0;
		if (KVRT_TRACING())
			kvrt_trace_counter("busy.depth", 1);
		if (KVRT_TRACING())
			kvrt_trace_slice("busy", t0, kvrt_now_ns(), f);
	}
	return NULL;
}

Test(trace, stop_and_restart_while_threads_write)
{
	fresh_start();
	enum { T = 3 };
	setenv("KVRT_TRACE_BUFFER", "4096", 1); /* overflow on the way too */
	char *p[3] = {tmp_path("r1"), tmp_path("r2"), tmp_path("r3")};
	pthread_t th[T];
	atomic_store(&keep_writing, 1);
	for (int i = 0; i < T; i++)
		cr_assert_eq(pthread_create(&th[i], NULL, busy_writer, NULL), 0);
	struct timespec ms = {0, 2000000};
	for (int round = 0; round < 3; round++) {
		cr_assert_eq(kvrt_trace_start(p[round]), 0);
		nanosleep(&ms, NULL);
		cr_assert_eq(kvrt_trace_stop(), 0);
		nanosleep(&ms, NULL);
	}
	atomic_store(&keep_writing, 0);
	for (int i = 0; i < T; i++)
		pthread_join(th[i], NULL);
	for (int round = 0; round < 3; round++) {
		char *d = read_file(p[round]);
		assert_json(d);
		size_t ns, nf;
		uint64_t *s = flow_ids(d, 's', &ns), *f = flow_ids(d, 'f', &nf);
		cr_assert_eq(ns, nf, "only flows with both ends get arrows");
		free(s);
		free(f);
		free(d);
		unlink(p[round]);
		free(p[round]);
	}
}

/* ---- output details ------------------------------------------------- */

Test(trace, names_are_escaped)
{
	fresh_start();
	static const char *const names[] = {
		"quote\"d", "back\\slash", "new\nline", "ctl\x01\x1f", "bad\xff\xc3utf8", "caf\xc3\xa9",
	};
	static const char *const want[] = {
		"\"quote\\\"d\"", "\"back\\\\slash\"", "\"new\\nline\"", "\"ctl\\u0001\\u001f\"",
		"\"bad\\ufffd\\ufffdutf8\"", "\"caf\xc3\xa9\"",
	};
	char *p = tmp_path("esc");
	cr_assert_eq(kvrt_trace_start(p), 0);
	kvrt_trace_thread_name("thr\"ead\t1");
	for (size_t i = 0; i < sizeof names / sizeof *names; i++)
		kvrt_trace_slice(names[i], kvrt_now_ns(), kvrt_now_ns() + 5, 0);
	cr_assert_eq(kvrt_trace_stop(), 0);
	char *doc = read_file(p);
	assert_json(doc);
	for (size_t i = 0; i < sizeof want / sizeof *want; i++)
		cr_assert_eq(count(doc, want[i]), 1, "escaped form of name %zu", i);
	cr_assert_eq(count(doc, "\"thr\\\"ead\\t1\""), 1);
	free(doc);
	unlink(p);
	free(p);
}

Test(trace, slice_timing_and_flow_binding)
{
	fresh_start();
	char *p = tmp_path("time");
	cr_assert_eq(kvrt_trace_start(p), 0);
	uint64_t t0 = kvrt_now_ns() + 5000000; /* 5 ms after start, 1.5 ms long */
	uint64_t f = kvrt_trace_flow_begin("arrow");
	kvrt_trace_slice("timed", t0, t0 + 1500000, f);
	cr_assert_eq(kvrt_trace_stop(), 0);
	char *doc = read_file(p);
	assert_json(doc);
	const char *x = strstr(doc, "\"name\":\"timed\"");
	cr_assert_not_null(x);
	double ts = strtod(strstr(x, "\"ts\":") + 5, NULL);
	double dur = strtod(strstr(x, "\"dur\":") + 6, NULL);
	cr_assert(ts >= 5000.0 && ts < 5000.0 + 1e6, "ts in us from the start: %f", ts);
	cr_assert(dur > 1499.999 && dur < 1500.001, "dur in us: %f", dur);
	const char *fe = strstr(doc, "\"ph\":\"f\"");
	cr_assert_not_null(fe);
	double fts = strtod(strstr(fe, "\"ts\":") + 5, NULL);
	cr_assert(fts >= ts && fts <= ts + dur, "the flow ends inside its slice");
	const char *se = strstr(doc, "\"ph\":\"s\"");
	cr_assert_not_null(se);
	cr_assert_eq(strtoull(strstr(se, "\"id\":") + 5, NULL, 10), f);
	/* The arrow's start sits in a post slice (a thread outside any slice). */
	const char *post = strstr(doc, "\"name\":\"post arrow\"");
	cr_assert_not_null(post);
	double pts = strtod(strstr(post, "\"ts\":") + 5, NULL);
	double pdur = strtod(strstr(post, "\"dur\":") + 6, NULL);
	double sts = strtod(strstr(se, "\"ts\":") + 5, NULL);
	cr_assert(sts >= pts && sts <= pts + pdur);
	cr_assert(pdur <= 1.0, "a post slice is at most 1 us");
	free(doc);
	unlink(p);
	free(p);
}

Test(trace, path_percent_p_is_the_pid)
{
	fresh_start();
	char want[256];
	snprintf(want, sizeof want, "/tmp/kvrt-test-trace-%d-pid.json", (int)getpid());
	unlink(want);
	cr_assert_eq(kvrt_trace_start("/tmp/kvrt-test-trace-%p-pid.json"), 0);
	kvrt_trace_counter("c", 1);
	cr_assert_eq(kvrt_trace_stop(), 0);
	cr_assert(exists(want), "%s not written", want);
	char *doc = read_file(want);
	assert_json(doc);
	cr_assert_eq(count(doc, "\"ph\":\"C\""), 1);
	free(doc);
	unlink(want);
}

Test(trace, write_failure_is_reported_not_fatal)
{
	fresh_start();
	const char *p = "/nonexistent-kvrt-dir/trace.json";
	cr_assert_eq(kvrt_trace_start(p), 0);
	kvrt_trace_counter("c", 1);
	cr_assert_eq(kvrt_trace_stop(), -ENOENT);
	cr_assert_eq(_kvrt_trace_on, 0);
	cr_assert(!exists(p));
	/* And tracing works again afterwards. */
	char *q = tmp_path("after");
	cr_assert_eq(kvrt_trace_start(q), 0);
	cr_assert_eq(kvrt_trace_stop(), 0);
	cr_assert(exists(q));
	unlink(q);
	free(q);
}

Test(trace, intern_copies_for_the_process_lifetime)
{
	fresh_start();
	char *s = strdup("actor-name");
	const char *a = kvrt_trace_intern(s);
	cr_assert_neq(a, s);
	cr_assert_str_eq(a, "actor-name");
	memset(s, 'x', strlen(s));
	free(s);
	cr_assert_str_eq(a, "actor-name");
	cr_assert_eq(kvrt_trace_intern("actor-name"), a, "equal strings share a copy");
	cr_assert_neq(kvrt_trace_intern("other"), a);
	/* Many distinct names (the table grows) stay distinct and intact. */
	const char *k[500];
	for (int i = 0; i < 500; i++) {
		char b[32];
		snprintf(b, sizeof b, "n%d", i);
		k[i] = kvrt_trace_intern(b);
	}
	for (int i = 0; i < 500; i++) {
		char b[32];
		snprintf(b, sizeof b, "n%d", i);
		cr_assert_str_eq(k[i], b);
		cr_assert_eq(kvrt_trace_intern(b), k[i]);
	}
	cr_assert_null(kvrt_trace_intern(NULL));
}
