/* kvrt's threads off the CPUs vLLM binds its OpenMP threads to
 * (runtime/cpus.h): the list parsers, the choice from the environment, and
 * an actor started by a thread pinned like vLLM's worker main thread
 * running on the other CPUs (before: on the pinned one, beside the
 * forward). */
#include <criterion/criterion.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "runtime/actor.h"
#include "runtime/cpus.h"

static void clear_env(void)
{
	unsetenv("OMP_PLACES");
	unsetenv("GOMP_CPU_AFFINITY");
	unsetenv("KMP_AFFINITY");
	unsetenv("KVRT_CPUS");
	unsetenv("VLLM_CPU_OMP_THREADS_BIND");
	_kvrt_cpus_reset();
}

static cpu_set_t set_of(const char *s)
{
	cpu_set_t c;
	CPU_ZERO(&c);
	cr_assert_eq(kvrt_cpus_parse(s, &c), 0, "%s", s);
	return c;
}

Test(cpus, parse_openmp_and_lists)
{
	cpu_set_t c = set_of("{0,1,2}");
	cr_assert(CPU_COUNT(&c) == 3 && CPU_ISSET(2, &c));
	c = set_of("0-3,8");
	cr_assert(CPU_COUNT(&c) == 5 && CPU_ISSET(3, &c) && CPU_ISSET(8, &c) && !CPU_ISSET(4, &c));
	c = set_of("{4:4}");
	cr_assert(CPU_COUNT(&c) == 4 && CPU_ISSET(4, &c) && CPU_ISSET(7, &c));
	c = set_of("{0:3:2}");
	cr_assert(CPU_COUNT(&c) == 3 && CPU_ISSET(0, &c) && CPU_ISSET(2, &c) && CPU_ISSET(4, &c));
	c = set_of("0 1 2"); /* GOMP_CPU_AFFINITY */
	cr_assert_eq(CPU_COUNT(&c), 3);
	const char *bad[] = {"", "cores", "threads(4)", "3-1", "{0:0}", "1,x", "99999", "{0:4}:2:4", "-1",
			     "0-", "{2:}"};
	for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
		CPU_ZERO(&c);
		cr_assert_eq(kvrt_cpus_parse(bad[i], &c), -EINVAL, "'%s' accepted", bad[i]);
	}
}

Test(cpus, openmp_binding_from_each_runtime, .fini = clear_env)
{
	clear_env();
	cpu_set_t c;
	cr_assert_eq(kvrt_cpus_openmp(&c), -ENOENT);
	setenv("OMP_PLACES", "cores", 1);
	cr_assert_eq(kvrt_cpus_openmp(&c), -ENOENT, "abstract places are not a list");
	setenv("OMP_PLACES", "{1}", 1);
	cr_assert_eq(kvrt_cpus_openmp(&c), 0);
	cr_assert(CPU_COUNT(&c) == 1 && CPU_ISSET(1, &c));
	unsetenv("OMP_PLACES");
	setenv("GOMP_CPU_AFFINITY", "0 2", 1);
	cr_assert_eq(kvrt_cpus_openmp(&c), 0);
	cr_assert(CPU_COUNT(&c) == 2 && CPU_ISSET(2, &c));
	unsetenv("GOMP_CPU_AFFINITY");
	setenv("KMP_AFFINITY", "granularity=fine,explicit,proclist=[3,5]", 1);
	cr_assert_eq(kvrt_cpus_openmp(&c), 0);
	cr_assert(CPU_COUNT(&c) == 2 && CPU_ISSET(5, &c));
}

/* The CPUs this test may use (the parent's mask is what cpus.c reads). */
static cpu_set_t usable(void)
{
	cpu_set_t c;
	CPU_ZERO(&c);
	cr_assert_eq(sched_getaffinity(getppid(), sizeof c, &c), 0);
	return c;
}

static int first_cpu(const cpu_set_t *c)
{
	for (int i = 0; i < CPU_SETSIZE; i++)
		if (CPU_ISSET(i, c))
			return i;
	return -1;
}

Test(cpus, choice_follows_the_environment, .fini = clear_env)
{
	cpu_set_t ok = usable(), c;
	clear_env();
	cr_assert_eq(kvrt_cpus_for_threads(&c), -ENOENT, "nothing bound: threads stay put");
	if (CPU_COUNT(&ok) < 2)
		cr_skip_test("one usable CPU");
	int omp = first_cpu(&ok);
	char v[32];
	snprintf(v, sizeof v, "{%d}", omp);
	setenv("OMP_PLACES", v, 1);
	_kvrt_cpus_reset();
	cr_assert_eq(kvrt_cpus_for_threads(&c), 0);
	cr_assert(!CPU_ISSET(omp, &c), "kvrt's threads avoid OpenMP's CPU");
	cr_assert_eq(CPU_COUNT(&c), CPU_COUNT(&ok) - 1, "and take every other usable one");
	/* Cores split by hand (two servers on one host): stay with OpenMP. */
	setenv("VLLM_CPU_OMP_THREADS_BIND", v + 1, 1);
	_kvrt_cpus_reset();
	cr_assert_eq(kvrt_cpus_for_threads(&c), -ENOENT);
	setenv("VLLM_CPU_OMP_THREADS_BIND", "auto", 1);
	_kvrt_cpus_reset();
	cr_assert_eq(kvrt_cpus_for_threads(&c), 0);
	unsetenv("VLLM_CPU_OMP_THREADS_BIND");
	setenv("KVRT_CPUS", "inherit", 1);
	_kvrt_cpus_reset();
	cr_assert_eq(kvrt_cpus_for_threads(&c), -ENOENT);
	snprintf(v, sizeof v, "%d", omp);
	setenv("KVRT_CPUS", v, 1);
	_kvrt_cpus_reset();
	cr_assert_eq(kvrt_cpus_for_threads(&c), 0);
	cr_assert(CPU_COUNT(&c) == 1 && CPU_ISSET(omp, &c), "an explicit list wins");
	setenv("KVRT_CPUS", "nonsense", 1);
	_kvrt_cpus_reset();
	cr_assert_eq(kvrt_cpus_for_threads(&c), -ENOENT, "a bad list leaves threads alone");
	unsetenv("KVRT_CPUS");
	/* OpenMP holds every usable CPU: nothing else to go to. */
	char all[64];
	snprintf(all, sizeof all, "0-%d", CPU_SETSIZE - 1);
	setenv("OMP_PLACES", all, 1);
	_kvrt_cpus_reset();
	cr_assert_eq(kvrt_cpus_for_threads(&c), -ENOENT);
}

enum { MSG_WHERE = 1 };

static void where(struct kvrt_actor *a, struct kvrt_msg *m)
{
	(void)a;
	cpu_set_t c;
	CPU_ZERO(&c);
	pthread_getaffinity_np(pthread_self(), sizeof c, &c);
	uint64_t mask = 0;
	for (int i = 0; i < 64 && i < CPU_SETSIZE; i++)
		if (CPU_ISSET(i, &c))
			mask |= 1ull << i;
	m->reply->value[0] = mask;
	kvrt_completion_signal(m->reply, 0);
}

static const struct kvrt_actor_ops where_ops = {.handle = where};

struct spawn {
	int omp;
	uint64_t mask;
};

/* As vLLM's worker: the main thread pinned to OpenMP's CPU creates kvrt. */
static void *pinned_creator(void *arg)
{
	struct spawn *sp = arg;
	cpu_set_t one;
	CPU_ZERO(&one);
	CPU_SET(sp->omp, &one);
	cr_assert_eq(pthread_setaffinity_np(pthread_self(), sizeof one, &one), 0);
	struct kvrt_actor *a;
	cr_assert_eq(kvrt_actor_create(&a, &(struct kvrt_actor_config){.name = "where", .mailbox_size = 64,
									  .ops = &where_ops}), 0);
	struct kvrt_msg m = {.type = MSG_WHERE};
	struct kvrt_completion done;
	cr_assert_eq(kvrt_actor_call(a, &m, &done, 2000000000ull), 0);
	sp->mask = done.value[0];
	kvrt_actor_destroy(a);
	return NULL;
}

Test(cpus, actors_leave_the_openmp_core, .fini = clear_env)
{
	cpu_set_t ok = usable();
	clear_env();
	if (CPU_COUNT(&ok) < 2)
		cr_skip_test("one usable CPU");
	struct spawn sp = {.omp = first_cpu(&ok)};
	if (sp.omp >= 64)
		cr_skip_test("CPU numbers beyond 63");
	char v[32];
	snprintf(v, sizeof v, "{%d}", sp.omp);
	setenv("OMP_PLACES", v, 1);
	_kvrt_cpus_reset();
	pthread_t t;
	cr_assert_eq(pthread_create(&t, NULL, pinned_creator, &sp), 0);
	pthread_join(t, NULL);
	cr_assert_neq(sp.mask, 0);
	cr_assert_eq(sp.mask & (1ull << sp.omp), 0, "the actor runs beside OpenMP (mask %llx)",
		     (unsigned long long)sp.mask);
	/* KVRT_CPUS=inherit: the creator's mask, as before. */
	setenv("KVRT_CPUS", "inherit", 1);
	_kvrt_cpus_reset();
	cr_assert_eq(pthread_create(&t, NULL, pinned_creator, &sp), 0);
	pthread_join(t, NULL);
	cr_assert_eq(sp.mask, 1ull << sp.omp);
}
