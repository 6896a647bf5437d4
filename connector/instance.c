/* connector/instance.c: see instance.h. */
#include "connector/instance.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <xxhash.h>

#include "actors/key.h"

/* --- the registry ------------------------------------------------------------- */

struct _kvrt_reg {
	char *instance;
	uint32_t tp_rank, pp_rank;
	struct kvrt_engine *e;
	struct _kvrt_reg *next;
};

static pthread_rwlock_t reg_lock = PTHREAD_RWLOCK_INITIALIZER; /* guards reg_head and
								* the engines lookups use */
static struct _kvrt_reg *reg_head;

int _kvrt_reg_add(const char *instance, uint32_t tp_rank, uint32_t pp_rank, struct kvrt_engine *e)
{
	struct _kvrt_reg *n = calloc(1, sizeof(*n));
	if (!n || !(n->instance = strdup(instance))) {
		free(n);
		return -ENOMEM;
	}
	n->tp_rank = tp_rank;
	n->pp_rank = pp_rank;
	n->e = e;
	int rc = 0;
	pthread_rwlock_wrlock(&reg_lock);
	for (struct _kvrt_reg *x = reg_head; x; x = x->next)
		if (!strcmp(x->instance, instance) && x->tp_rank == tp_rank && x->pp_rank == pp_rank)
			rc = -EEXIST;
	if (!rc) {
		n->next = reg_head;
		reg_head = n;
	}
	pthread_rwlock_unlock(&reg_lock);
	if (rc) {
		free(n->instance);
		free(n);
	}
	return rc;
}

void _kvrt_reg_remove(struct kvrt_engine *e)
{
	struct _kvrt_reg *gone = NULL;
	pthread_rwlock_wrlock(&reg_lock);
	for (struct _kvrt_reg **pp = &reg_head; *pp; pp = &(*pp)->next)
		if ((*pp)->e == e) {
			gone = *pp;
			*pp = gone->next;
			break;
		}
	pthread_rwlock_unlock(&reg_lock);
	if (gone) {
		free(gone->instance);
		free(gone);
	}
}

struct kvrt_engine *_kvrt_reg_rdlock(const char *instance)
{
	pthread_rwlock_rdlock(&reg_lock);
	for (struct _kvrt_reg *x = reg_head; x; x = x->next)
		if (!strcmp(x->instance, instance) && x->tp_rank == 0 && x->pp_rank == 0)
			return x->e;
	return NULL;
}

void _kvrt_reg_wrlock(void)
{
	pthread_rwlock_wrlock(&reg_lock);
}

void _kvrt_reg_unlock(void)
{
	pthread_rwlock_unlock(&reg_lock);
}

/* --- option helpers ------------------------------------------------------------ */

char *_kvrt_dupstr(const char *s)
{
	return strdup(s ? s : "");
}

int _kvrt_read_config(struct kvrt_config *c, const struct kvrt_options *o, char *err, size_t errlen)
{
	int rc = kvrt_config_init(c, err, errlen);
	if (rc)
		return rc;
	for (uint32_t i = 0; i < o->num_keys; i++) {
		rc = kvrt_config_set(c, o->keys[i], o->values[i], err, errlen);
		if (rc)
			return rc;
	}
	return kvrt_config_check(c, err, errlen);
}

uint64_t _kvrt_model_ns(const struct kvrt_options *o, uint32_t tp_rank, uint32_t pp_rank)
{
	struct kvrt_key_namespace ns = {.model_id = o->model_id, .dtype = o->dtype,
					.tp_rank = tp_rank, .tp_size = o->tp_size ? o->tp_size : 1,
					.pp_rank = pp_rank, .pp_size = o->pp_size ? o->pp_size : 1};
	return kvrt_key_namespace_hash(&ns);
}

uint64_t _kvrt_req_ns(const struct kvrt_options *o, const struct kvrt_request *r)
{
	struct kvrt_key_bytes ex[64];
	uint32_t nex = r->num_extra;
	if (nex > 64) /* fold the rest into the last one's hash */
		nex = 64;
	for (uint32_t i = 0; i < nex; i++)
		ex[i] = (struct kvrt_key_bytes){r->extra[i].data, r->extra[i].len};
	uint64_t more = 0;
	for (uint32_t i = 64; i < r->num_extra; i++)
		more = XXH3_64bits_withSeed(r->extra[i].data, r->extra[i].len, more);
	struct kvrt_key_bytes exm = {&more, sizeof more};
	if (r->num_extra > 64)
		ex[63] = exm;
	struct kvrt_key_namespace ns = {.model_id = o->model_id, .dtype = o->dtype,
					.tp_rank = 0, .tp_size = o->tp_size ? o->tp_size : 1,
					.pp_rank = 0, .pp_size = o->pp_size ? o->pp_size : 1,
					.lora_name = r->lora_name, .lora_id = r->lora_id,
					.cache_salt = {r->cache_salt.data, r->cache_salt.len},
					.extra = ex, .num_extra = nex};
	return kvrt_key_namespace_hash(&ns);
}

/* Lookup sockets (connector/lookup_socket.h) between a scheduler and
 * workers of other processes: KVRT_LOOKUP_SOCKET=1 turns them on, =0 off;
 * unset, they are on when the workers may run in another process
 * (KVRT_OPT_WORKERS_ELSEWHERE) or the instance has more than one rank
 * (TP x PP > 1). A scheduler still reads a worker of its own process
 * directly when there is one. Rank k = pp_rank * tp_size + tp_rank. */
bool _kvrt_lsock_wanted(const struct kvrt_options *o)
{
	const char *v = getenv("KVRT_LOOKUP_SOCKET");
	if (v && v[0])
		return v[0] == '1';
	uint64_t world = (uint64_t)(o->tp_size ? o->tp_size : 1) * (o->pp_size ? o->pp_size : 1);
	return world > 1 || (o->flags & KVRT_OPT_WORKERS_ELSEWHERE);
}
