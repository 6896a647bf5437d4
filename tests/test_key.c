/* tests/test_key.c: chunk keys (actors/key.h) against the spec's vectors
 * (docs/keys.md) and their properties. */
#include <criterion/criterion.h>
#include <string.h>

#include "actors/key.h"
#include "tests/test_util.h"

/* The namespaces of docs/keys.md. */
static struct kvrt_key_namespace ns_a(void)
{
	return (struct kvrt_key_namespace){
		.model_id = "meta-llama/Llama-3.1-8B-Instruct",
		.dtype = "bfloat16",
		.layout = 1,
		.tp_rank = 0,
		.tp_size = 1,
		.pp_rank = 0,
		.pp_size = 1,
	};
}

static const struct kvrt_key_bytes extra_b[2] = {{"\x01\x02\x03", 3}, {"image-hash-0", 12}};

static struct kvrt_key_namespace ns_b(void)
{
	struct kvrt_key_namespace b = ns_a();
	b.tp_rank = 1;
	b.tp_size = 2;
	b.lora_name = "sql-lora";
	b.lora_id = 7;
	b.cache_salt = (struct kvrt_key_bytes){"salt-1", 6};
	b.extra = extra_b;
	b.num_extra = 2;
	return b;
}

Test(key, namespace_vectors)
{
	struct kvrt_key_namespace a = ns_a(), b = ns_b(), z = {0};
	cr_expect_eq(kvrt_key_namespace_hash(&a), 0x21572654b652ee54ull);
	cr_expect_eq(kvrt_key_namespace_hash(&b), 0x5402caef9c2d9f50ull);
	cr_expect_eq(kvrt_key_namespace_hash(&z), 0xdab1dc9cc71048f4ull);
}

Test(key, chain_vectors_small)
{
	struct kvrt_key_namespace a = ns_a();
	uint64_t seed = kvrt_key_namespace_hash(&a);
	uint32_t t[10];
	for (uint32_t i = 0; i < 10; i++)
		t[i] = i;
	struct kvrt_chunk_key k[4];
	memset(k, 0xa5, sizeof(k));
	cr_assert_eq(kvrt_key_prompt(seed, t, 10, 4, true, k, 4), 3);
	static const struct kvrt_chunk_key want[3] = {
		{.lo = 0x890fe68ffcb14de6ull, .hi = 0x27a7e9216b8f9b2aull},
		{.lo = 0xb3d592a63c673841ull, .hi = 0x5478e5a0d1ca6e75ull},
		{.lo = 0xaa9287a91a4fde2cull, .hi = 0x7c2aad3f922f7b82ull}, /* tail of 2 */
	};
	for (int i = 0; i < 3; i++)
		cr_expect(kvrt_chunk_key_eq(k[i], want[i]), "chunk %d", i);
	/* Untouched beyond the count. */
	cr_expect_eq(k[3].lo, 0xa5a5a5a5a5a5a5a5ull);
}

Test(key, chain_vectors_256)
{
	struct kvrt_key_namespace b = ns_b();
	uint64_t seed = kvrt_key_namespace_hash(&b);
	uint32_t u[600];
	for (uint64_t j = 0; j < 600; j++)
		u[j] = (uint32_t)((1000003ull * j + 7) % 151936);
	struct kvrt_chunk_key k[3];
	cr_assert_eq(kvrt_key_prompt(seed, u, 600, 256, true, k, 3), 3);
	static const struct kvrt_chunk_key want[3] = {
		{.lo = 0x45459afe8bbf1e18ull, .hi = 0x619a6a1876c54f19ull},
		{.lo = 0xc2d7111117fd190aull, .hi = 0xea62ede1ce9bdd6aull},
		{.lo = 0x755ea59f37456d1full, .hi = 0x32d06ff56376d6abull}, /* tail of 88 */
	};
	for (int i = 0; i < 3; i++)
		cr_expect(kvrt_chunk_key_eq(k[i], want[i]), "chunk %d", i);
	char hex[33];
	kvrt_key_format(want[0], hex);
	cr_expect_str_eq(hex, "619a6a1876c54f1945459afe8bbf1e18");
}

/* The prompt API equals chaining kvrt_key_chunk by hand. */
Test(key, prompt_equals_chain)
{
	uint64_t rs = 0x1234;
	enum { N = 4 * 256 + 17 };
	static uint32_t t[N];
	for (int i = 0; i < N; i++)
		t[i] = (uint32_t)kvrt_test_rand(&rs);
	struct kvrt_chunk_key k[5];
	cr_assert_eq(kvrt_key_prompt(99, t, N, 256, true, k, 5), 5);
	struct kvrt_chunk_key prev = kvrt_key_root();
	for (int i = 0; i < 4; i++) {
		prev = kvrt_key_chunk(99, prev, t + i * 256, 256);
		cr_expect(kvrt_chunk_key_eq(prev, k[i]));
	}
	cr_expect(kvrt_chunk_key_eq(kvrt_key_chunk(99, prev, t + 1024, 17), k[4]));
	/* Without the tail: 4 keys, same values. */
	struct kvrt_chunk_key k2[5];
	cr_expect_eq(kvrt_key_prompt(99, t, N, 256, false, k2, 5), 4);
	cr_expect_eq(memcmp(k, k2, 4 * sizeof(k[0])), 0);
	/* cap stops early, no tail when full chunks were cut. */
	cr_expect_eq(kvrt_key_prompt(99, t, N, 256, true, k2, 2), 2);
	cr_expect_eq(kvrt_key_prompt(99, t, N, 0, true, k2, 5), 0);
	cr_expect_eq(kvrt_key_prompt(99, t, 100, 256, false, k2, 5), 0);
}

/* A prefix shares its keys; a change in chunk i changes i and all later. */
Test(key, prefix_property)
{
	uint64_t rs = 77;
	enum { N = 8 * 64 };
	uint32_t t[N];
	for (int i = 0; i < N; i++)
		t[i] = (uint32_t)kvrt_test_rand(&rs) % 200000;
	struct kvrt_chunk_key a[8], b[8];
	kvrt_key_prompt(5, t, N, 64, false, a, 8);
	t[3 * 64 + 10] ^= 1;
	kvrt_key_prompt(5, t, N, 64, false, b, 8);
	for (int i = 0; i < 3; i++)
		cr_expect(kvrt_chunk_key_eq(a[i], b[i]));
	for (int i = 3; i < 8; i++)
		cr_expect(!kvrt_chunk_key_eq(a[i], b[i]));
}

/* Every namespace field changes the seed and so every key. */
Test(key, namespace_fields)
{
	struct kvrt_key_namespace base = ns_b();
	uint64_t h0 = kvrt_key_namespace_hash(&base);
	uint64_t hs[16];
	int n = 0;
	struct kvrt_key_namespace v;
#define VARIANT(...)                                                   \
	do {                                                           \
		v = base;                                              \
		__VA_ARGS__;                                                \
		hs[n++] = kvrt_key_namespace_hash(&v);                 \
	} while (0)
	VARIANT(v.model_id = "meta-llama/Llama-3.1-70B-Instruct");
	VARIANT(v.dtype = "fp8_e4m3");
	VARIANT(v.layout = 2);
	VARIANT(v.tp_rank = 0);
	VARIANT(v.tp_size = 4);
	VARIANT(v.pp_rank = 1);
	VARIANT(v.pp_size = 2);
	VARIANT(v.lora_name = "other-lora");
	VARIANT(v.lora_id = 8);
	VARIANT(v.cache_salt = (struct kvrt_key_bytes){"salt-2", 6});
	VARIANT(v.cache_salt = (struct kvrt_key_bytes){NULL, 0});
	VARIANT(v.num_extra = 1);
	VARIANT(v.extra = &extra_b[1]; v.num_extra = 1);
	/* Moving bytes between adjacent fields must change the hash
	 * (the length prefixes make the encoding unambiguous). */
	VARIANT(v.model_id = "meta-llama/Llama-3.1-8B-Instructb"; v.dtype = "float16");
	VARIANT(v.lora_name = "sql-lorasalt-1"; v.cache_salt = (struct kvrt_key_bytes){NULL, 0});
#undef VARIANT
	for (int i = 0; i < n; i++) {
		cr_expect_neq(hs[i], h0, "variant %d", i);
		for (int j = 0; j < i; j++)
			cr_expect_neq(hs[i], hs[j], "variants %d %d", i, j);
	}
	/* NULL strings equal empty strings. */
	struct kvrt_key_namespace e1 = {.model_id = NULL}, e2 = {.model_id = ""};
	cr_expect_eq(kvrt_key_namespace_hash(&e1), kvrt_key_namespace_hash(&e2));

	/* Different seeds give different keys for the same tokens. */
	uint32_t t[16];
	for (int i = 0; i < 16; i++)
		t[i] = 1000 + i;
	struct kvrt_chunk_key k0 = kvrt_key_chunk(h0, kvrt_key_root(), t, 16);
	for (int i = 0; i < n; i++)
		cr_expect(!kvrt_chunk_key_eq(k0, kvrt_key_chunk(hs[i], kvrt_key_root(), t, 16)));
}

/* A tail chunk's key differs from any full chunk over the same tokens. */
Test(key, tail_differs)
{
	uint32_t t[256];
	for (int i = 0; i < 256; i++)
		t[i] = (uint32_t)(i * 31 + 5);
	struct kvrt_chunk_key full = kvrt_key_chunk(1, kvrt_key_root(), t, 256);
	for (uint32_t n = 1; n < 256; n++) {
		struct kvrt_chunk_key tail = kvrt_key_chunk(1, kvrt_key_root(), t, n);
		cr_expect(!kvrt_chunk_key_eq(full, tail), "n=%u", n);
		if (n > 1)
			cr_expect(!kvrt_chunk_key_eq(tail, kvrt_key_chunk(1, kvrt_key_root(), t, n - 1)));
	}
	/* Token 0 appended is not the same as a shorter tail. */
	uint32_t z[3] = {7, 8, 0};
	cr_expect(!kvrt_chunk_key_eq(kvrt_key_chunk(1, kvrt_key_root(), z, 2),
				     kvrt_key_chunk(1, kvrt_key_root(), z, 3)));
}

/* No two keys collide over many random chunks (128-bit: none expected). */
Test(key, distinct)
{
	uint64_t n = kvrt_test_scaled(20000, 1000);
	struct kvrt_chunk_key *k = malloc(n * sizeof(*k));
	cr_assert(k);
	uint64_t rs = 3;
	uint32_t t[16];
	for (uint64_t i = 0; i < n; i++) {
		for (int j = 0; j < 16; j++)
			t[j] = (uint32_t)kvrt_test_rand(&rs);
		k[i] = kvrt_key_chunk(42, kvrt_key_root(), t, 16);
	}
	/* Low words: a sort-free check through a small open hash. */
	uint64_t cap = 1;
	while (cap < 4 * n)
		cap <<= 1;
	uint64_t *slot = calloc(cap, sizeof(uint64_t));
	cr_assert(slot);
	for (uint64_t i = 0; i < n; i++) {
		uint64_t h = k[i].lo | 1;
		uint64_t s = h & (cap - 1);
		while (slot[s]) {
			cr_assert_neq(slot[s], h, "collision at %llu", (unsigned long long)i);
			s = (s + 1) & (cap - 1);
		}
		slot[s] = h;
	}
	free(slot);
	free(k);
}
