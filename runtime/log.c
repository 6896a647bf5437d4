/* runtime/log.c: see log.h. */
#include "runtime/log.h"

#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int _kvrt_fence_word; /* see kvrt_fence_seq_cst() */

static _Atomic int log_level = -1; /* -1: not read from KVRT_LOG yet */

static int level_from_env(void)
{
	const char *s = getenv("KVRT_LOG");
	if (!s || !*s)
		return KVRT_LOG_WARN;
	static const char *const names[] = {"error", "warn", "info", "debug"};
	for (int i = 0; i < (int)KVRT_ARRAY_LEN(names); i++)
		if (!strcmp(s, names[i]))
			return i;
	return KVRT_LOG_WARN;
}

bool kvrt_log_enabled(enum kvrt_log_level level)
{
	int l = atomic_load_explicit(&log_level, memory_order_relaxed);
	if (KVRT_UNLIKELY(l < 0)) {
		l = level_from_env();
		atomic_store_explicit(&log_level, l, memory_order_relaxed);
	}
	return (int)level <= l;
}

void kvrt_log(enum kvrt_log_level level, const char *fmt, ...)
{
	static const char *const tag[] = {"error", "warning", "info", "debug"};
	if (!kvrt_log_enabled(level))
		return;
	char line[1024];
	int n = snprintf(line, sizeof line, "kvrt: %s: ", tag[level]);
	va_list ap;
	va_start(ap, fmt);
	int m = vsnprintf(line + n, sizeof line - (size_t)n - 1, fmt, ap);
	va_end(ap);
	size_t len = (size_t)n + (m < 0 ? 0 : (size_t)m);
	if (len > sizeof line - 2)
		len = sizeof line - 2;
	line[len++] = '\n';
	/* One write: lines from several threads never interleave mid-line. */
	ssize_t w = write(STDERR_FILENO, line, len);
	(void)w;
}

void kvrt_assert_fail(const char *expr, const char *file, int line)
{
	fprintf(stderr, "kvrt: internal invariant failed: %s (%s:%d); this is a kvrt bug\n",
		expr, file, line);
	abort();
}
