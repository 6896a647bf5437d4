/* tests/test_util.h: helpers shared by kvrt's Criterion tests. */
#ifndef KVRT_TESTS_UTIL_H
#define KVRT_TESTS_UTIL_H

#include <stdint.h>
#include <stdlib.h>

/* Iteration count scaled by KVRT_TEST_SCALE (1 in plain builds, smaller under
 * the sanitizers, see tests/run.sh), never below min. */
static inline uint64_t kvrt_test_scaled(uint64_t n, uint64_t min)
{
	const char *s = getenv("KVRT_TEST_SCALE");
	double f = s ? atof(s) : 1.0;
	if (f <= 0)
		f = 1.0;
	uint64_t r = (uint64_t)((double)n * f);
	return r < min ? min : r;
}

/* xorshift64*: deterministic per seed, never zero output streams. */
static inline uint64_t kvrt_test_rand(uint64_t *state)
{
	uint64_t x = *state;
	x ^= x >> 12;
	x ^= x << 25;
	x ^= x >> 27;
	*state = x;
	return x * 0x2545F4914F6CDD1DULL;
}

#endif
