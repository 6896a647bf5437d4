/* tests/trace_demo.c: a small actor workload for the tracer.
 *
 * Two actors, "alpha" and "beta". Two producer threads post work: producer 0
 * to alpha, producer 1 to alpha and beta in turn. Alpha forwards every odd
 * message to beta (a post from inside a handler). The main thread asks both
 * actors for their counts with kvrt_actor_call while the producers run and
 * once after, then checks that nothing was lost or duplicated.
 *
 * Run with KVRT_TRACE=/path/trace.json (kvrt_actor_create starts the tracer;
 * the trace is written at exit) to get real actor slices, mailbox counters
 * and flows; tests/check-trace.sh does, and checks the file.
 *
 * Usage: trace_demo [messages per producer, default 3000]
 * Prints "handled alpha=N beta=M" (every handled message, calls included);
 * exits 0 when the counts are right, 1 otherwise.
 */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "runtime/actor.h"
#include "runtime/trace.h"

enum { MSG_WORK = 1, MSG_FWD = 2, MSG_GET = 3 };

struct counts {
	uint64_t work;    /* MSG_WORK handled */
	uint64_t fwd;     /* MSG_FWD handled */
	uint64_t get;     /* MSG_GET handled */
	uint64_t sum;     /* of the work payloads */
	struct kvrt_actor *next; /* where odd work is forwarded, or NULL */
	int failed;       /* a forward failed */
};

static const char *msg_name(uint32_t type)
{
	switch (type) {
	case MSG_WORK:
		return "work";
	case MSG_FWD:
		return "fwd";
	case MSG_GET:
		return "get";
	}
	return NULL;
}

static void handle(struct kvrt_actor *a, struct kvrt_msg *m)
{
	struct counts *c = kvrt_actor_data(a);
	/* A little work, so slices have a visible width. */
	uint64_t x = m->arg.u64[0];
	for (int i = 0; i < 50; i++)
		x = x * 6364136223846793005u + 1442695040888963407u;
	m->arg.u64[1] = x;
	switch (m->type) {
	case MSG_WORK:
		c->work++;
		c->sum += m->arg.u64[0];
		if (c->next && (m->arg.u64[0] & 1)) {
			struct kvrt_msg f = {.type = MSG_FWD, .arg.u64 = {m->arg.u64[0]}};
			if (kvrt_actor_post(c->next, &f, 5000000000u) != 0)
				c->failed = 1;
		}
		break;
	case MSG_FWD:
		c->fwd++;
		c->sum += m->arg.u64[0];
		break;
	case MSG_GET:
		c->get++;
		if (m->reply) {
			m->reply->value[0] = c->work;
			m->reply->value[1] = c->fwd;
			m->reply->value[2] = c->sum;
			m->reply->value[3] = (uint64_t)c->failed;
			kvrt_completion_signal(m->reply, 0);
		}
		break;
	}
}

static const struct kvrt_actor_ops ops = {.handle = handle, .msg_name = msg_name};

struct producer {
	pthread_t th;
	int idx;
	uint64_t n;                 /* messages to post */
	struct kvrt_actor *to[2];   /* targets, used in turn */
	uint64_t posted[2];         /* accepted, per target */
	uint64_t odd[2];            /* accepted odd payloads, per target */
	uint64_t sum[2];            /* of accepted payloads, per target */
	uint64_t oddsum[2];         /* of accepted odd payloads, per target */
	int failed;                 /* a post failed */
};

static void *producer_main(void *arg)
{
	struct producer *p = arg;
	char name[32];
	snprintf(name, sizeof name, "producer-%d", p->idx);
	kvrt_trace_thread_name(name);
	for (uint64_t i = 0; i < p->n; i++) {
		int t = p->to[1] ? (int)(i & 1) : 0;
		uint64_t v = (uint64_t)p->idx * 1000003u + i * 7 + 1;
		struct kvrt_msg m = {.type = MSG_WORK, .arg.u64 = {v}};
		if (kvrt_actor_post(p->to[t], &m, 5000000000u) != 0) {
			p->failed = 1;
			continue;
		}
		p->posted[t]++;
		p->odd[t] += v & 1;
		p->sum[t] += v;
		p->oddsum[t] += v & 1 ? v : 0;
	}
	return NULL;
}

static int ask(struct kvrt_actor *a, uint64_t out[4])
{
	struct kvrt_msg m = {.type = MSG_GET};
	struct kvrt_completion c;
	int rc = kvrt_actor_call(a, &m, &c, 5000000000u);
	if (rc == 0)
		memcpy(out, c.value, 4 * sizeof *out);
	return rc;
}

int main(int argc, char **argv)
{
	uint64_t n = argc > 1 ? strtoull(argv[1], NULL, 0) : 3000;
	struct counts ca = {0}, cb = {0};
	struct kvrt_actor *alpha = NULL, *beta = NULL;
	int rc = kvrt_actor_create(&beta, &(struct kvrt_actor_config){
		.name = "beta", .mailbox_size = 256, .ops = &ops, .data = &cb});
	if (rc == 0)
		rc = kvrt_actor_create(&alpha, &(struct kvrt_actor_config){
			.name = "alpha", .mailbox_size = 256, .ops = &ops, .data = &ca});
	if (rc != 0) {
		fprintf(stderr, "trace_demo: kvrt_actor_create: %s\n", strerror(-rc));
		kvrt_actor_destroy(beta);
		return 1;
	}
	ca.next = beta;

	struct producer p[2] = {
		{.idx = 0, .n = n, .to = {alpha, NULL}},
		{.idx = 1, .n = n, .to = {alpha, beta}},
	};
	for (int i = 0; i < 2; i++)
		if (pthread_create(&p[i].th, NULL, producer_main, &p[i]) != 0) {
			fprintf(stderr, "trace_demo: pthread_create failed\n");
			return 1;
		}
	/* Request/reply while the producers run. */
	uint64_t v[4];
	int bad = 0;
	for (int i = 0; i < 20; i++)
		bad |= ask(i & 1 ? beta : alpha, v) != 0;
	for (int i = 0; i < 2; i++)
		pthread_join(p[i].th, NULL);

	/* FIFO: alpha's reply comes after all producer work, and so after its
	 * forwards to beta were posted; beta's reply comes after those. */
	uint64_t va[4] = {0}, vb[4] = {0};
	bad |= ask(alpha, va) != 0;
	bad |= ask(beta, vb) != 0;
	uint64_t want_a = p[0].posted[0] + p[1].posted[0];
	uint64_t want_b = p[1].posted[1];
	uint64_t want_fwd = p[0].odd[0] + p[1].odd[0];
	uint64_t sum_a = p[0].sum[0] + p[1].sum[0];
	uint64_t sum_b = p[1].sum[1] + p[0].oddsum[0] + p[1].oddsum[0];
	for (int i = 0; i < 2; i++)
		bad |= p[i].failed;
	if (bad || va[3] || va[0] != want_a || vb[0] != want_b || vb[1] != want_fwd ||
	    va[2] != sum_a || vb[2] != sum_b || want_a != 2 * n - n / 2) {
		fprintf(stderr,
			"trace_demo: wrong counts: alpha work %lu (want %lu), beta work %lu (want %lu), "
			"beta fwd %lu (want %lu), failed %d/%lu\n",
			(unsigned long)va[0], (unsigned long)want_a, (unsigned long)vb[0],
			(unsigned long)want_b, (unsigned long)vb[1], (unsigned long)want_fwd, bad,
			(unsigned long)va[3]);
		return 1;
	}
	kvrt_actor_destroy(alpha);
	kvrt_actor_destroy(beta);
	/* Every handled message, calls included: one trace slice each. */
	printf("handled alpha=%lu beta=%lu\n", (unsigned long)(ca.work + ca.fwd + ca.get),
	       (unsigned long)(cb.work + cb.fwd + cb.get));
	return 0;
}
