/* Completions: signal before/after wait, timeouts, cross-thread wake-up. */
#include <criterion/criterion.h>
#include <errno.h>
#include <pthread.h>
#include <unistd.h>

#include "runtime/completion.h"

Test(completion, signal_before_wait_returns_at_once)
{
	struct kvrt_completion c;
	kvrt_completion_init(&c);
	c.value[0] = 7;
	kvrt_completion_signal(&c, -EIO);
	cr_assert(kvrt_completion_done(&c));
	cr_assert_eq(kvrt_completion_wait(&c, 0), 0);
	cr_assert_eq(c.status, -EIO);
	cr_assert_eq(c.value[0], 7);
}

Test(completion, timeout_then_late_signal)
{
	struct kvrt_completion c;
	kvrt_completion_init(&c);
	uint64_t t0 = kvrt_now_ns();
	cr_assert_eq(kvrt_completion_wait(&c, 5 * 1000 * 1000), -ETIMEDOUT);
	cr_assert_geq(kvrt_now_ns() - t0, 5 * 1000 * 1000, "returned before its timeout");
	cr_assert_not(kvrt_completion_done(&c));
	kvrt_completion_signal(&c, 0);
	cr_assert_eq(kvrt_completion_wait(&c, 5 * 1000 * 1000), 0);
}

static void *late_signaller(void *arg)
{
	struct kvrt_completion *c = arg;
	usleep(20 * 1000); /* long enough that the waiter is asleep in the futex */
	c->value[1] = 99;
	kvrt_completion_signal(c, 0);
	return NULL;
}

Test(completion, sleeping_waiter_is_woken)
{
	struct kvrt_completion c;
	kvrt_completion_init(&c);
	pthread_t t;
	pthread_create(&t, NULL, late_signaller, &c);
	cr_assert_eq(kvrt_completion_wait(&c, UINT64_MAX), 0);
	cr_assert_eq(c.value[1], 99);
	pthread_join(t, NULL);
}
