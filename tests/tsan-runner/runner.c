/* tests/tsan-runner/runner.c: runs the tests registered through
 * tests/tsan-runner/criterion/criterion.h (see there for why). */
#include "criterion/criterion.h"

#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#define MAX_TESTS 1024

struct test {
	const char *suite, *name;
	void (*fn)(void);
	const struct _kvrt_cr_opts *opts;
};

static struct test tests[MAX_TESTS];
static int ntests;
static jmp_buf test_exit;     /* where a skip returns to */
static bool current_failed;   /* a cr_expect failed in the current test */
static const struct test *current;

void _kvrt_cr_register(const char *suite, const char *name, void (*fn)(void),
		       const struct _kvrt_cr_opts *opts)
{
	if (ntests == MAX_TESTS) {
		fprintf(stderr, "tsan-runner: more than %d tests\n", MAX_TESTS);
		exit(2);
	}
	tests[ntests++] = (struct test){suite, name, fn, opts};
}

static void finish(int passed, int failed, int skipped)
{
	printf("[====] Synthesis: Tested: %d | Passing: %d | Failing: %d | Crashing: 0 \n",
	       passed + failed, passed, failed);
	if (skipped)
		printf("[====] (%d skipped)\n", skipped);
	fflush(stdout);
}

static int n_passed, n_skipped;

bool _kvrt_cr_check(bool ok, bool fatal, const char *file, int line, const char *expr,
		    const char *fmt, ...)
{
	if (ok)
		return true;
	printf("[----] %s:%d: %s failed: %s\n", file, line, fatal ? "Assertion" : "Expectation",
	       expr);
	if (fmt && fmt[0] && fmt[1]) {
		va_list ap;
		va_start(ap, fmt);
		printf("[----]   ");
		vprintf(fmt, ap);
		printf("\n");
		va_end(ap);
	}
	current_failed = true;
	if (fatal) {
		/* Threads of the failed test may still use its stack: stop here. */
		printf("[FAIL] %s::%s\n", current->suite, current->name);
		finish(n_passed, 1, n_skipped);
		fflush(stdout);
		_exit(1);
	}
	return false;
}

_Noreturn void _kvrt_cr_skip(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	printf("[SKIP] %s::%s: ", current->suite, current->name);
	vprintf(fmt, ap);
	printf("\n");
	va_end(ap);
	longjmp(test_exit, 1);
}

void _kvrt_cr_log(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	printf("[----] ");
	vprintf(fmt, ap);
	printf("\n");
	va_end(ap);
}

static void on_alarm(int sig)
{
	(void)sig;
	static const char msg[] = "[FAIL] test timed out\n";
	ssize_t w = write(STDOUT_FILENO, msg, sizeof msg - 1);
	(void)w;
	_exit(1);
}

/* 1 passed, 0 failed, -1 skipped. Its own frame, so setjmp clobbers nothing
 * the caller keeps. */
static int run_one(const struct test *t)
{
	current = t;
	current_failed = false;
	alarm(t->opts->timeout > 0 ? (unsigned)(t->opts->timeout * 4) + 1 : 0);
	int r;
	if (setjmp(test_exit) == 0) {
		if (t->opts->init)
			t->opts->init();
		t->fn();
		if (t->opts->fini)
			t->opts->fini();
		printf("[%s] %s::%s\n", current_failed ? "FAIL" : "PASS", t->suite, t->name);
		r = current_failed ? 0 : 1;
	} else {
		r = -1;
	}
	alarm(0);
	fflush(stdout);
	return r;
}

int main(int argc, char **argv)
{
	const char *filter = NULL;
	for (int i = 1; i < argc; i++)
		if (!strncmp(argv[i], "--filter=", 9))
			filter = argv[i] + 9;
	signal(SIGALRM, on_alarm);
	int failed = 0;
	for (int i = 0; i < ntests; i++) {
		const struct test *t = &tests[i];
		char full[256];
		snprintf(full, sizeof full, "%s/%s", t->suite, t->name);
		if (filter && !strstr(full, filter))
			continue;
		if (t->opts->disabled || t->opts->signal || t->opts->exit_code) {
			printf("[SKIP] %s::%s: needs Criterion's forking runner\n", t->suite, t->name);
			n_skipped++;
			continue;
		}
		int r = run_one(t);
		if (r > 0)
			n_passed++;
		else if (r == 0)
			failed++;
		else
			n_skipped++;
	}
	finish(n_passed, failed, n_skipped);
	return failed ? 1 : 0;
}
