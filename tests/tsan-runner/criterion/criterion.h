/* tests/tsan-runner/criterion/criterion.h: the subset of Criterion's API that
 * kvrt's tests use, for the ThreadSanitizer build only.
 *
 * Why: Criterion (2.4, Debian 12) cannot start under TSan: its BoxFort
 * "inheritable arena" maps shared memory at a fixed address TSan refuses
 * ("Could not initialize inheritable arena"), so every Criterion binary
 * aborts before its first test. The TSan variant therefore compiles the same
 * test sources against this header (its -I comes first) and links
 * tests/tsan-runner/runner.c instead of -lcriterion. Tests run one after
 * another in one process (no fork); the first failed cr_assert ends the
 * binary with exit status 1 after printing where and why; cr_expect marks the
 * test failed and goes on. The closing line has Criterion's format so
 * tests/run.sh counts both runners alike.
 */
#ifndef KVRT_TSAN_RUNNER_CRITERION_H
#define KVRT_TSAN_RUNNER_CRITERION_H

#include <stdbool.h>
#include <stddef.h>
#include <string.h>

struct _kvrt_cr_opts {
	double timeout;          /* seconds; 0 = none (enforced with alarm) */
	bool disabled;           /* skip this test */
	const char *description; /* shown in the log */
	void (*init)(void);      /* run before the test */
	void (*fini)(void);      /* run after the test */
	int signal;              /* unsupported here: such tests are skipped */
	int exit_code;           /* unsupported here: such tests are skipped */
};

void _kvrt_cr_register(const char *suite, const char *name, void (*fn)(void),
		       const struct _kvrt_cr_opts *opts);
bool _kvrt_cr_check(bool ok, bool fatal, const char *file, int line, const char *expr,
		    const char *fmt, ...) __attribute__((format(printf, 6, 7)));
_Noreturn void _kvrt_cr_skip(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void _kvrt_cr_log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

#define Test(suite, name, ...)                                                        \
	static void suite##_##name##_impl(void);                                       \
	static const struct _kvrt_cr_opts suite##_##name##_opts = {__VA_ARGS__};       \
	__attribute__((constructor)) static void suite##_##name##_reg(void)            \
	{                                                                              \
		_kvrt_cr_register(#suite, #name, suite##_##name##_impl,                \
				  &suite##_##name##_opts);                             \
	}                                                                              \
	static void suite##_##name##_impl(void)

#define _KVRT_CR(ok, fatal, expr, ...) \
	_kvrt_cr_check((ok), (fatal), __FILE__, __LINE__, expr, " " __VA_ARGS__)

#define cr_assert(c, ...) _KVRT_CR(!!(c), true, #c, __VA_ARGS__)
#define cr_expect(c, ...) _KVRT_CR(!!(c), false, #c, __VA_ARGS__)
#define cr_assert_not(c, ...) _KVRT_CR(!(c), true, "!(" #c ")", __VA_ARGS__)
#define cr_expect_not(c, ...) _KVRT_CR(!(c), false, "!(" #c ")", __VA_ARGS__)
#define cr_assert_fail(...) _KVRT_CR(false, true, "cr_assert_fail", __VA_ARGS__)

#define _KVRT_CR_CMP(a, op, b, fatal, ...) \
	_KVRT_CR((a)op(b), fatal, #a " " #op " " #b, __VA_ARGS__)
#define cr_assert_eq(a, b, ...) _KVRT_CR_CMP(a, ==, b, true, __VA_ARGS__)
#define cr_assert_neq(a, b, ...) _KVRT_CR_CMP(a, !=, b, true, __VA_ARGS__)
#define cr_assert_lt(a, b, ...) _KVRT_CR_CMP(a, <, b, true, __VA_ARGS__)
#define cr_assert_leq(a, b, ...) _KVRT_CR_CMP(a, <=, b, true, __VA_ARGS__)
#define cr_assert_gt(a, b, ...) _KVRT_CR_CMP(a, >, b, true, __VA_ARGS__)
#define cr_assert_geq(a, b, ...) _KVRT_CR_CMP(a, >=, b, true, __VA_ARGS__)
#define cr_expect_eq(a, b, ...) _KVRT_CR_CMP(a, ==, b, false, __VA_ARGS__)
#define cr_expect_neq(a, b, ...) _KVRT_CR_CMP(a, !=, b, false, __VA_ARGS__)
#define cr_expect_lt(a, b, ...) _KVRT_CR_CMP(a, <, b, false, __VA_ARGS__)
#define cr_expect_leq(a, b, ...) _KVRT_CR_CMP(a, <=, b, false, __VA_ARGS__)
#define cr_expect_gt(a, b, ...) _KVRT_CR_CMP(a, >, b, false, __VA_ARGS__)
#define cr_expect_geq(a, b, ...) _KVRT_CR_CMP(a, >=, b, false, __VA_ARGS__)
#define cr_assert_null(p, ...) _KVRT_CR((p) == NULL, true, #p " == NULL", __VA_ARGS__)
#define cr_assert_not_null(p, ...) _KVRT_CR((p) != NULL, true, #p " != NULL", __VA_ARGS__)
#define cr_expect_null(p, ...) _KVRT_CR((p) == NULL, false, #p " == NULL", __VA_ARGS__)
#define cr_expect_not_null(p, ...) _KVRT_CR((p) != NULL, false, #p " != NULL", __VA_ARGS__)
#define cr_assert_str_eq(a, b, ...) \
	_KVRT_CR(strcmp((a), (b)) == 0, true, #a " equals " #b, __VA_ARGS__)
#define cr_expect_str_eq(a, b, ...) \
	_KVRT_CR(strcmp((a), (b)) == 0, false, #a " equals " #b, __VA_ARGS__)
#define cr_assert_str_neq(a, b, ...) \
	_KVRT_CR(strcmp((a), (b)) != 0, true, #a " differs from " #b, __VA_ARGS__)

#define cr_skip_test(...) _kvrt_cr_skip(" " __VA_ARGS__)
#define cr_log_info(...) _kvrt_cr_log(__VA_ARGS__)
#define cr_log_warn(...) _kvrt_cr_log(__VA_ARGS__)
#define cr_log_error(...) _kvrt_cr_log(__VA_ARGS__)

#endif
