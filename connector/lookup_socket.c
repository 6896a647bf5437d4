/* connector/lookup_socket.c: the lookup socket (connector/lookup_socket.h):
 * codec, paths, the "lookup-srv" actor and the scheduler's client.
 *
 * The server's state (listener, connections, scratch) is touched only on
 * its actor's thread once it runs (the start hook arms the watchers, the
 * stop hook closes them); start/stop hand it over through the actor's
 * create/join. Its counters are relaxed atomics: they order nothing.
 *
 * The client uses plain non-blocking sockets and poll() on the caller's
 * thread, bounded by one deadline per call.
 */
#include "runtime/bytes.h"
#include "connector/lookup_socket.h"

#include <dirent.h>
#include <errno.h>
#include <ev.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>
#include <xxhash.h>

#include "runtime/actor.h"
#include "runtime/log.h"

/* --- codec ------------------------------------------------------------------ */

static void put_hdr(uint8_t *b, uint16_t type, uint32_t len)
{
	memcpy(b, KVRT_LSOCK_MAGIC, 4);
	kvrt_put_le16(b + 4, KVRT_LSOCK_VERSION);
	kvrt_put_le16(b + 6, type);
	kvrt_put_le32(b + 8, len);
}

size_t kvrt_lsock_encode_lookup(uint8_t *buf, size_t cap, uint64_t seq, uint64_t req_id,
				uint64_t ns_hash, const uint32_t *tokens, uint32_t n)
{
	if (n > KVRT_LSOCK_MAX_TOKENS)
		return 0;
	size_t len = 28u + 4u * (size_t)n, total = KVRT_LSOCK_HDR + len;
	if (total > cap)
		return 0;
	put_hdr(buf, KVRT_LSOCK_LOOKUP, (uint32_t)len);
	uint8_t *p = buf + KVRT_LSOCK_HDR;
	kvrt_put_le64(p, seq);
	kvrt_put_le64(p + 8, req_id);
	kvrt_put_le64(p + 16, ns_hash);
	kvrt_put_le32(p + 24, n);
	if (n)
		memcpy(p + 28, tokens, 4u * (size_t)n);
	return total;
}

/* A frame whose payload is one u64 (RELEASE, RESET). */
static size_t encode_u64(uint8_t *buf, size_t cap, uint16_t type, uint64_t v)
{
	if (cap < KVRT_LSOCK_RELEASE_BYTES)
		return 0;
	put_hdr(buf, type, 8);
	kvrt_put_le64(buf + KVRT_LSOCK_HDR, v);
	return KVRT_LSOCK_RELEASE_BYTES;
}

size_t kvrt_lsock_encode_release(uint8_t *buf, size_t cap, uint64_t req_id)
{
	return encode_u64(buf, cap, KVRT_LSOCK_RELEASE, req_id);
}

size_t kvrt_lsock_encode_reset(uint8_t *buf, size_t cap, uint64_t seq)
{
	return encode_u64(buf, cap, KVRT_LSOCK_RESET, seq);
}

size_t kvrt_lsock_encode_answer(uint8_t *buf, size_t cap, uint64_t seq, int32_t status,
				const struct kvrt_lookup_result *res)
{
	if (cap < KVRT_LSOCK_ANSWER_BYTES)
		return 0;
	put_hdr(buf, KVRT_LSOCK_ANSWER, 28);
	uint8_t *p = buf + KVRT_LSOCK_HDR;
	kvrt_put_le64(p, seq);
	kvrt_put_le32(p + 8, (uint32_t)status);
	kvrt_put_le32(p + 12, res->tokens_now);
	kvrt_put_le32(p + 16, res->tokens);
	kvrt_put_le32(p + 20, res->chunks_now);
	kvrt_put_le32(p + 24, res->chunks);
	return KVRT_LSOCK_ANSWER_BYTES;
}

int kvrt_lsock_frame_size(const uint8_t *buf, size_t have, size_t *total)
{
	if (have < KVRT_LSOCK_HDR)
		return -EAGAIN;
	if (memcmp(buf, KVRT_LSOCK_MAGIC, 4) || kvrt_get_le16(buf + 4) != KVRT_LSOCK_VERSION)
		return -EBADMSG;
	uint32_t len = kvrt_get_le32(buf + 8);
	switch (kvrt_get_le16(buf + 6)) {
	case KVRT_LSOCK_LOOKUP:
		if (len < 28 || (len - 28) % 4 || (len - 28) / 4 > KVRT_LSOCK_MAX_TOKENS)
			return -EBADMSG;
		break;
	case KVRT_LSOCK_RELEASE:
	case KVRT_LSOCK_RESET:
		if (len != 8)
			return -EBADMSG;
		break;
	case KVRT_LSOCK_ANSWER:
		if (len != 28)
			return -EBADMSG;
		break;
	default:
		return -EBADMSG;
	}
	*total = KVRT_LSOCK_HDR + (size_t)len;
	return 0;
}

int kvrt_lsock_decode(const uint8_t *buf, size_t len, struct kvrt_lsock_frame *f)
{
	size_t total;
	memset(f, 0, sizeof(*f));
	if (kvrt_lsock_frame_size(buf, len, &total) || total != len)
		return -EBADMSG;
	const uint8_t *p = buf + KVRT_LSOCK_HDR;
	f->type = (enum kvrt_lsock_type)kvrt_get_le16(buf + 6);
	switch (f->type) {
	case KVRT_LSOCK_LOOKUP:
		f->seq = kvrt_get_le64(p);
		f->req_id = kvrt_get_le64(p + 8);
		f->ns_hash = kvrt_get_le64(p + 16);
		f->num_tokens = kvrt_get_le32(p + 24);
		/* The count must agree with the length the header gave. */
		if ((size_t)f->num_tokens * 4 + 28 != len - KVRT_LSOCK_HDR)
			return -EBADMSG;
		f->tokens = p + 28;
		return 0;
	case KVRT_LSOCK_RELEASE:
		f->req_id = kvrt_get_le64(p);
		return 0;
	case KVRT_LSOCK_RESET:
		f->seq = kvrt_get_le64(p);
		return 0;
	case KVRT_LSOCK_ANSWER:
		f->seq = kvrt_get_le64(p);
		f->status = (int32_t)kvrt_get_le32(p + 8);
		f->res.tokens_now = kvrt_get_le32(p + 12);
		f->res.tokens = kvrt_get_le32(p + 16);
		f->res.chunks_now = kvrt_get_le32(p + 20);
		f->res.chunks = kvrt_get_le32(p + 24);
		if (f->res.tokens_now > f->res.tokens || f->res.chunks_now > f->res.chunks)
			return -EBADMSG;
		return 0;
	}
	return -EBADMSG;
}

/* --- paths ------------------------------------------------------------------ */

/* mkdir 0700 (if missing), then insist it is ours and closed to others. */
static int private_dir(const char *d, bool make)
{
	if (make && mkdir(d, 0700) && errno != EEXIST)
		return -errno;
	struct stat st;
	if (lstat(d, &st))
		return -errno;
	if (!S_ISDIR(st.st_mode) || st.st_uid != geteuid() || (st.st_mode & 077)) {
		kvrt_error("%s is not a private directory of this user: no lookup socket", d);
		return -EPERM;
	}
	return 0;
}

static int fill_addr(struct sockaddr_un *sa, const char *path)
{
	memset(sa, 0, sizeof(*sa));
	sa->sun_family = AF_UNIX;
	size_t l = strlen(path);
	if (!l || l >= sizeof sa->sun_path)
		return -ENAMETOOLONG;
	memcpy(sa->sun_path, path, l);
	return 0;
}

/* The instance directory of a socket path (path cut at its last '/'). */
static void dir_of(char *dir, size_t cap, const char *path)
{
	snprintf(dir, cap, "%s", path);
	char *sl = strrchr(dir, '/');
	if (sl)
		*sl = '\0';
}

/* What killed processes left in kvrt's socket base (the instance
 * directory's parent, private to this user; kvrt_lsock_path checked it): sockets nobody listens on are removed,
 * then instance directories left empty, except own (being set up) and
 * those changed in the last minute (another engine may be starting there:
 * its rank sockets are not bound yet). vLLM's engine_id is a fresh uuid per
 * start, so without this every killed server left a directory behind. */
#define _SWEEP_AGE_S 60
static void sweep_stale(const char *own_dir)
{
	char base[sizeof(((struct sockaddr_un *)0)->sun_path)];
	dir_of(base, sizeof base, own_dir);
	DIR *d = opendir(base);
	if (!d)
		return;
	time_t now = time(NULL);
	struct dirent *de;
	while ((de = readdir(d))) {
		if (de->d_name[0] == '.')
			continue;
		char sub[sizeof base];
		int n = snprintf(sub, sizeof sub, "%s/%s", base, de->d_name);
		struct stat st;
		if (n < 0 || (size_t)n >= sizeof sub || !strcmp(sub, own_dir) || lstat(sub, &st) ||
		    !S_ISDIR(st.st_mode) || st.st_uid != geteuid())
			continue;
		bool old = now - st.st_mtime >= _SWEEP_AGE_S; /* before unlinks touch it */
		DIR *sd = opendir(sub);
		if (!sd)
			continue;
		struct dirent *se;
		while ((se = readdir(sd))) {
			char f[sizeof base];
			struct sockaddr_un sa;
			n = snprintf(f, sizeof f, "%s/%s", sub, se->d_name);
			if (se->d_name[0] == '.' || n < 0 || (size_t)n >= sizeof f || fill_addr(&sa, f))
				continue;
			int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
			if (fd < 0)
				continue;
			struct stat fs;
			bool dead = !lstat(f, &fs) && S_ISSOCK(fs.st_mode) &&
				    connect(fd, (const struct sockaddr *)&sa, sizeof sa) && errno == ECONNREFUSED;
			close(fd);
			if (dead && !unlink(f))
				kvrt_info("removed the stale lookup socket %s", f);
		}
		/* A rank's saves-done file (connector/saves_done.h) without its
		 * socket, in a directory untouched for a minute: its worker is
		 * gone (one starting creates it just before its socket). */
		rewinddir(sd);
		while (old && (se = readdir(sd))) {
			char f[sizeof base], sock[sizeof base + 8];
			size_t nl = strlen(se->d_name);
			n = snprintf(f, sizeof f, "%s/%s", sub, se->d_name);
			if (se->d_name[0] == '.' || nl < 7 || strcmp(se->d_name + nl - 6, ".saves") ||
			    n < 0 || (size_t)n >= sizeof f)
				continue;
			snprintf(sock, sizeof sock, "%.*s.sock", n - 6, f);
			struct stat fs;
			if (lstat(sock, &fs) && errno == ENOENT && !lstat(f, &fs) && S_ISREG(fs.st_mode))
				unlink(f);
		}
		closedir(sd);
		if (old)
			rmdir(sub); /* only when empty */
	}
	closedir(d);
}

int kvrt_lsock_path(char *buf, size_t cap, const char *instance, uint32_t rank, bool make_dirs)
{
	struct sockaddr_un sa;
	const char *inst = instance ? instance : "";
	size_t il = strlen(inst);
	bool plain = il >= 1 && il <= 64 && inst[0] != '.';
	for (size_t i = 0; i < il && plain; i++) {
		char ch = inst[i];
		plain = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
			ch == '.' || ch == '_' || ch == '-';
	}
	char name[72];
	if (plain)
		snprintf(name, sizeof name, "%s", inst);
	else
		snprintf(name, sizeof name, "h%016llx", (unsigned long long)XXH3_64bits(inst, il));
	const char *xdg = getenv("XDG_RUNTIME_DIR");
	char base[256];
	int n;
	if (xdg && xdg[0] == '/')
		n = snprintf(base, sizeof base, "%s/kvrt", xdg);
	else
		n = snprintf(base, sizeof base, "/tmp/kvrt-%u", (unsigned)geteuid());
	if (n < 0 || (size_t)n >= sizeof base)
		return -ENAMETOOLONG;
	n = snprintf(buf, cap, "%s/%s/rank%u.sock", base, name, rank);
	if (n < 0 || (size_t)n >= cap || (size_t)n >= sizeof sa.sun_path)
		return -ENAMETOOLONG;
	if (!make_dirs)
		return 0;
	int rc = private_dir(base, true);
	if (rc)
		return rc;
	/* buf holds base/name/rankK.sock: cut it at the last '/'. */
	char dir[sizeof sa.sun_path];
	memcpy(dir, buf, (size_t)n + 1);
	*strrchr(dir, '/') = '\0';
	rc = private_dir(dir, true);
	if (!rc)
		sweep_stale(dir);
	return rc;
}


/* --- server ----------------------------------------------------------------- */

#define _MAX_CONNS 64u
#define _READ_MIN 4096u

struct _conn {
	ev_io io;                       /* readable (first: the callback's cast) */
	struct kvrt_lsock_server *s;    /* owner */
	uint8_t *buf;                   /* bytes received, not yet handled */
	size_t have, cap;
	struct _conn *next;             /* list */
};

struct kvrt_lsock_server {
	ev_io lio;                      /* the listener (first: the callback's cast) */
	struct kvrt_engine *e;          /* answers lookups */
	struct kvrt_actor *actor;       /* "lookup-srv" */
	int fd;                         /* listening socket */
	char path[sizeof(((struct sockaddr_un *)0)->sun_path)];
	dev_t dev;                      /* the socket file we bound (unlink only it) */
	ino_t ino;
	struct _conn *conns;            /* open connections */
	uint32_t nconns;
	uint32_t *tok;                  /* aligned token scratch */
	size_t tok_cap;
	struct kvrt_lsock_server_stats st; /* relaxed atomics */
};

#define _COUNT(s, f) __atomic_fetch_add(&(s)->st.f, 1, __ATOMIC_RELAXED)

static void conn_close(struct kvrt_lsock_server *s, struct _conn *c)
{
	ev_io_stop(kvrt_actor_loop(s->actor), &c->io);
	close(c->io.fd);
	for (struct _conn **pp = &s->conns; *pp; pp = &(*pp)->next)
		if (*pp == c) {
			*pp = c->next;
			break;
		}
	s->nconns--;
	free(c->buf);
	free(c);
}

/* Send an ANSWER. false: it could not be sent (close the connection). */
static bool answer(struct kvrt_lsock_server *s, int fd, uint64_t seq, int rc,
		   const struct kvrt_lookup_result *res)
{
	uint8_t out[KVRT_LSOCK_ANSWER_BYTES];
	size_t n = kvrt_lsock_encode_answer(out, sizeof out, seq, rc, res);
	/* An answer is 40 bytes: a socket buffer that cannot take it belongs
	 * to a client that does not read. Never wait for it. */
	ssize_t w = send(fd, out, n, MSG_NOSIGNAL | MSG_DONTWAIT);
	if (w != (ssize_t)n) {
		_COUNT(s, write_failed);
		return false;
	}
	return true;
}

/* Handle one whole frame. false: close the connection. */
static bool serve_frame(struct kvrt_lsock_server *s, const uint8_t *b, size_t len, int fd)
{
	struct kvrt_lsock_frame f;
	if (kvrt_lsock_decode(b, len, &f) || f.type == KVRT_LSOCK_ANSWER) {
		_COUNT(s, malformed);
		return false;
	}
	if (f.type == KVRT_LSOCK_RELEASE) {
		kvrt_engine_release(s->e, f.req_id);
		_COUNT(s, releases);
		return true;
	}
	struct kvrt_lookup_result res = {0};
	int rc;
	if (f.type == KVRT_LSOCK_RESET) {
		uint64_t dropped = 0, kept = 0;
		rc = kvrt_engine_reset(s->e, &dropped, &kept);
		res.tokens = dropped > UINT32_MAX ? UINT32_MAX : (uint32_t)dropped;
		res.chunks = kept > UINT32_MAX ? UINT32_MAX : (uint32_t)kept;
		_COUNT(s, resets);
		return answer(s, fd, f.seq, rc, &res);
	}
	if (f.num_tokens > s->tok_cap) {
		size_t c = s->tok_cap ? s->tok_cap : 1024;
		while (c < f.num_tokens)
			c *= 2;
		uint32_t *t = realloc(s->tok, c * sizeof(*t));
		if (!t) {
			_COUNT(s, write_failed);
			return false;
		}
		s->tok = t;
		s->tok_cap = c;
	}
	if (f.num_tokens)
		memcpy(s->tok, f.tokens, 4u * (size_t)f.num_tokens);
	rc = kvrt_engine_lookup(s->e, f.req_id, f.ns_hash, s->tok, f.num_tokens, &res);
	if (rc)
		res = (struct kvrt_lookup_result){0};
	if (!answer(s, fd, f.seq, rc, &res))
		return false;
	_COUNT(s, lookups);
	return true;
}

static void conn_cb(struct ev_loop *loop, ev_io *w, int revents)
{
	(void)loop;
	(void)revents;
	struct _conn *c = (struct _conn *)w;
	struct kvrt_lsock_server *s = c->s;
	for (;;) {
		/* Room for the frame being received (its size known once its
		 * header is in), at least _READ_MIN. */
		size_t want = _READ_MIN, total = 0;
		int fr = kvrt_lsock_frame_size(c->buf, c->have, &total);
		if (fr == -EBADMSG) {
			_COUNT(s, malformed);
			conn_close(s, c);
			return;
		}
		if (!fr && total > want)
			want = total;
		if (c->cap < want) {
			uint8_t *nb = realloc(c->buf, want);
			if (!nb) {
				conn_close(s, c);
				return;
			}
			c->buf = nb;
			c->cap = want;
		}
		ssize_t r = recv(c->io.fd, c->buf + c->have, c->cap - c->have, MSG_DONTWAIT);
		if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
			return;
		if (r <= 0) {
			if (c->have) /* ended mid-frame */
				_COUNT(s, malformed);
			conn_close(s, c);
			return;
		}
		c->have += (size_t)r;
		/* Serve every whole frame received. */
		size_t off = 0;
		for (;;) {
			int rc = kvrt_lsock_frame_size(c->buf + off, c->have - off, &total);
			if (rc == -EAGAIN || (!rc && total > c->have - off))
				break;
			if (rc || !serve_frame(s, c->buf + off, total, c->io.fd)) {
				if (rc)
					_COUNT(s, malformed);
				conn_close(s, c);
				return;
			}
			off += total;
		}
		memmove(c->buf, c->buf + off, c->have - off);
		c->have -= off;
		/* A big frame's buffer goes back to its usual size when drained. */
		if (!c->have && c->cap > 16 * _READ_MIN) {
			free(c->buf);
			c->buf = NULL;
			c->cap = 0;
		}
	}
}

static void accept_cb(struct ev_loop *loop, ev_io *w, int revents)
{
	(void)revents;
	struct kvrt_lsock_server *s = (struct kvrt_lsock_server *)w;
	for (;;) {
		int fd = accept4(s->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (fd < 0)
			return; /* EAGAIN, or a transient error: the next wake-up retries */
		/* Only this user's processes may ask (the directory's modes say
		 * so too; this holds even where they are loosened). */
		struct ucred cred = {.uid = (uid_t)-1};
		socklen_t cl = sizeof cred;
		if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &cl) || cred.uid != geteuid()) {
			if (!__atomic_fetch_add(&s->st.foreign, 1, __ATOMIC_RELAXED))
				kvrt_warn("lookup socket %s: a process of uid %d was refused (only uid %d may ask)",
					  s->path, (int)cred.uid, (int)geteuid());
			close(fd);
			continue;
		}
		struct _conn *c = s->nconns < _MAX_CONNS ? calloc(1, sizeof(*c)) : NULL;
		if (!c) {
			_COUNT(s, refused);
			close(fd);
			continue;
		}
		_COUNT(s, accepted);
		c->s = s;
		c->next = s->conns;
		s->conns = c;
		s->nconns++;
		ev_io_init(&c->io, conn_cb, fd, EV_READ);
		ev_io_start(loop, &c->io);
	}
}

static void srv_handle(struct kvrt_actor *a, struct kvrt_msg *m)
{
	(void)a;
	if (m->reply)
		kvrt_completion_signal(m->reply, 0);
}

static int srv_start(struct kvrt_actor *a)
{
	struct kvrt_lsock_server *s = kvrt_actor_data(a);
	s->actor = a;
	ev_io_init(&s->lio, accept_cb, s->fd, EV_READ);
	ev_io_start(kvrt_actor_loop(a), &s->lio);
	return 0;
}

static void srv_stop(struct kvrt_actor *a)
{
	struct kvrt_lsock_server *s = kvrt_actor_data(a);
	ev_io_stop(kvrt_actor_loop(a), &s->lio);
	while (s->conns)
		conn_close(s, s->conns);
}

static const struct kvrt_actor_ops srv_ops = {.handle = srv_handle, .start = srv_start, .stop = srv_stop};

/* Path exists: replace it when it is a dead server's socket. */
static int clear_stale(const char *path, const struct sockaddr_un *sa)
{
	struct stat st;
	if (lstat(path, &st))
		return errno == ENOENT ? 0 : -errno;
	if (!S_ISSOCK(st.st_mode))
		return -EEXIST;
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (fd < 0)
		return -errno;
	int rc = connect(fd, (const struct sockaddr *)sa, sizeof(*sa));
	int e = rc ? errno : 0;
	close(fd);
	if (!rc || e == EAGAIN)
		return -EADDRINUSE; /* someone listens there */
	if (e != ECONNREFUSED)
		return -e;
	kvrt_info("replacing the stale lookup socket %s", path);
	if (unlink(path) && errno != ENOENT)
		return -errno;
	return 0;
}

int kvrt_lsock_server_start(struct kvrt_lsock_server **out, struct kvrt_engine *e, const char *path)
{
	*out = NULL;
	struct sockaddr_un sa;
	int rc = fill_addr(&sa, path);
	if (rc)
		return rc;
	struct kvrt_lsock_server *s = calloc(1, sizeof(*s));
	if (!s)
		return -ENOMEM;
	s->e = e;
	s->fd = -1;
	snprintf(s->path, sizeof s->path, "%s", path);
	rc = clear_stale(path, &sa);
	if (rc)
		goto fail;
	s->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (s->fd < 0) {
		rc = -errno;
		goto fail;
	}
	if (bind(s->fd, (const struct sockaddr *)&sa, sizeof sa)) {
		rc = errno == EADDRINUSE ? -EADDRINUSE : -errno;
		goto fail_fd;
	}
	struct stat st;
	/* 0600 from here on; until now the 0700 directory kept others out. */
	if (chmod(path, 0600) || lstat(path, &st)) {
		rc = -errno;
		goto fail_unlink;
	}
	s->dev = st.st_dev;
	s->ino = st.st_ino;
	if (listen(s->fd, 64)) {
		rc = -errno;
		goto fail_unlink;
	}
	rc = kvrt_actor_create(&s->actor, &(struct kvrt_actor_config){
						   .name = "lookup-srv", .mailbox_size = 4,
						   .ops = &srv_ops, .data = s});
	if (rc)
		goto fail_unlink;
	*out = s;
	return 0;
fail_unlink:
	unlink(path);
fail_fd:
	close(s->fd);
fail:
	free(s);
	return rc;
}

void kvrt_lsock_server_stop(struct kvrt_lsock_server *s)
{
	if (!s)
		return;
	kvrt_actor_destroy(s->actor);
	close(s->fd);
	struct stat st;
	/* Another server may have replaced a socket it thought stale. */
	if (!lstat(s->path, &st) && st.st_dev == s->dev && st.st_ino == s->ino)
		unlink(s->path);
	/* The instance directory goes with its last rank (rmdir refuses
	 * while other ranks' sockets are there). */
	char dir[sizeof s->path];
	dir_of(dir, sizeof dir, s->path);
	rmdir(dir);
	free(s->tok);
	free(s);
}

void kvrt_lsock_server_stats(struct kvrt_lsock_server *s, struct kvrt_lsock_server_stats *out)
{
	out->accepted = __atomic_load_n(&s->st.accepted, __ATOMIC_RELAXED);
	out->refused = __atomic_load_n(&s->st.refused, __ATOMIC_RELAXED);
	out->lookups = __atomic_load_n(&s->st.lookups, __ATOMIC_RELAXED);
	out->releases = __atomic_load_n(&s->st.releases, __ATOMIC_RELAXED);
	out->resets = __atomic_load_n(&s->st.resets, __ATOMIC_RELAXED);
	out->malformed = __atomic_load_n(&s->st.malformed, __ATOMIC_RELAXED);
	out->write_failed = __atomic_load_n(&s->st.write_failed, __ATOMIC_RELAXED);
	out->foreign = __atomic_load_n(&s->st.foreign, __ATOMIC_RELAXED);
}

/* --- client ----------------------------------------------------------------- */

enum { _UNKNOWN, _UP, _DOWN };

struct _rank {
	struct sockaddr_un sa;        /* its socket */
	int fd;                       /* connection, or -1 */
	int state;                    /* _UNKNOWN, _UP, _DOWN: logged on change */
	uint64_t retry_ns;            /* timed out: not asked before this */
	bool pending;                 /* this call: request sent, answer awaited */
	bool answered;                /* this call: answer in res */
	bool inprogress;              /* this call: the answer was -EINPROGRESS */
	struct kvrt_lookup_result res;
	uint8_t rbuf[2 * KVRT_LSOCK_ANSWER_BYTES]; /* answer bytes received */
	size_t rhave;
};

struct kvrt_lsock_client {
	struct _rank *r;              /* [n] */
	uint32_t n;
	uint64_t timeout_ns;
	uint64_t seq;                 /* lookups sent */
	uint8_t *buf;                 /* request scratch */
	size_t cap;
	struct pollfd *pfd;           /* [n] */
	uint32_t *who;                /* [n]: rank of pfd[i] */
};

int kvrt_lsock_client_create(struct kvrt_lsock_client **out, const char *const *paths, uint32_t n,
			     uint32_t timeout_ms)
{
	*out = NULL;
	if (!n)
		return -EINVAL;
	struct kvrt_lsock_client *c = calloc(1, sizeof(*c));
	if (!c)
		return -ENOMEM;
	c->r = calloc(n, sizeof(*c->r));
	c->pfd = calloc(n, sizeof(*c->pfd));
	c->who = calloc(n, sizeof(*c->who));
	if (!c->r || !c->pfd || !c->who) {
		kvrt_lsock_client_destroy(c);
		return -ENOMEM;
	}
	c->n = n;
	for (uint32_t i = 0; i < n; i++) {
		c->r[i].fd = -1;
		if (fill_addr(&c->r[i].sa, paths[i])) {
			kvrt_lsock_client_destroy(c);
			return -EINVAL;
		}
	}
	c->timeout_ns = (uint64_t)(timeout_ms ? timeout_ms : 1) * 1000000ull;
	*out = c;
	return 0;
}

void kvrt_lsock_client_destroy(struct kvrt_lsock_client *c)
{
	if (!c)
		return;
	for (uint32_t i = 0; c->r && i < c->n; i++)
		if (c->r[i].fd >= 0)
			close(c->r[i].fd);
	free(c->r);
	free(c->pfd);
	free(c->who);
	free(c->buf);
	free(c);
}

static void rank_down(struct _rank *r, uint32_t k, const char *why, uint64_t backoff_until)
{
	if (r->fd >= 0)
		close(r->fd);
	r->fd = -1;
	r->rhave = 0;
	r->pending = false;
	r->retry_ns = backoff_until;
	if (r->state != _DOWN)
		kvrt_warn("lookup socket %s (rank %u) %s: its lookups answer no hit%s", r->sa.sun_path,
			  k, why, backoff_until ? " (retried in a few seconds)" : "");
	r->state = _DOWN;
}

static void rank_up(struct _rank *r, uint32_t k)
{
	if (r->state == _DOWN)
		kvrt_info("lookup socket %s (rank %u) answers again", r->sa.sun_path, k);
	r->state = _UP;
}

/* Write all of b[0..n) before the deadline. */
static int send_all(int fd, const uint8_t *b, size_t n, uint64_t deadline)
{
	size_t off = 0;
	while (off < n) {
		ssize_t w = send(fd, b + off, n - off, MSG_NOSIGNAL | MSG_DONTWAIT);
		if (w > 0) {
			off += (size_t)w;
			continue;
		}
		if (w < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
			return -errno;
		uint64_t now = kvrt_now_ns();
		if (now >= deadline)
			return -ETIMEDOUT;
		struct pollfd p = {.fd = fd, .events = POLLOUT};
		int ms = (int)((deadline - now + 999999) / 1000000);
		if (poll(&p, 1, ms) < 0 && errno != EINTR)
			return -errno;
	}
	return 0;
}

/* Read what rank r sent; true when its answer to seq is in (or it failed). */
static void rank_read(struct kvrt_lsock_client *c, struct _rank *r, uint32_t k)
{
	for (;;) {
		ssize_t n = recv(r->fd, r->rbuf + r->rhave, sizeof r->rbuf - r->rhave, MSG_DONTWAIT);
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
			return;
		if (n <= 0) {
			rank_down(r, k, "closed the connection", 0);
			return;
		}
		r->rhave += (size_t)n;
		size_t total;
		int rc;
		while (!(rc = kvrt_lsock_frame_size(r->rbuf, r->rhave, &total)) && total <= r->rhave) {
			struct kvrt_lsock_frame f;
			if (kvrt_lsock_decode(r->rbuf, total, &f) || f.type != KVRT_LSOCK_ANSWER) {
				rank_down(r, k, "sent a malformed answer", 0);
				return;
			}
			memmove(r->rbuf, r->rbuf + total, r->rhave - total);
			r->rhave -= total;
			if (f.seq != c->seq)
				continue; /* cannot happen: late answers close the connection */
			r->pending = false;
			if (f.status && f.status != -EINPROGRESS) {
				r->answered = false;
				rank_down(r, k, "failed a call", 0);
				return;
			}
			r->answered = true;
			r->inprogress = f.status == -EINPROGRESS; /* it asked Redis */
			r->res = f.res;
			rank_up(r, k);
			return;
		}
		if (rc == -EBADMSG) {
			rank_down(r, k, "sent a malformed answer", 0);
			return;
		}
	}
}

/* Send c->buf[0..len) to every rank (they work in parallel), then collect
 * their answers until the deadline. true when every rank answered. */
static bool ask_all(struct kvrt_lsock_client *c, size_t len, uint64_t start, uint64_t deadline)
{
	bool ok = true;
	/* Send to every rank first (they work in parallel), then collect. */
	for (uint32_t k = 0; k < c->n; k++) {
		struct _rank *r = &c->r[k];
		r->pending = r->answered = r->inprogress = false;
		if (r->retry_ns > start) {
			ok = false;
			continue;
		}
		r->retry_ns = 0;
		if (r->fd < 0) {
			r->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
			if (r->fd < 0 || connect(r->fd, (const struct sockaddr *)&r->sa, sizeof r->sa)) {
				char why[96];
				snprintf(why, sizeof why, "cannot be reached (%s)", strerror(errno));
				rank_down(r, k, why, 0);
				ok = false;
				continue;
			}
			r->rhave = 0;
		}
		int rc = send_all(r->fd, c->buf, len, deadline);
		if (rc) {
			rank_down(r, k, rc == -ETIMEDOUT ? "took no request in time" : "broke the connection",
				  rc == -ETIMEDOUT ? kvrt_now_ns() + KVRT_LSOCK_BACKOFF_MS * 1000000ull : 0);
			ok = false;
			continue;
		}
		r->pending = true;
	}
	for (;;) {
		uint32_t np = 0;
		for (uint32_t k = 0; k < c->n; k++)
			if (c->r[k].pending) {
				c->pfd[np] = (struct pollfd){.fd = c->r[k].fd, .events = POLLIN};
				c->who[np++] = k;
			}
		if (!np)
			break;
		uint64_t now = kvrt_now_ns();
		if (now >= deadline) {
			/* Late: its answer would be read as the next call's. */
			for (uint32_t i = 0; i < np; i++)
				rank_down(&c->r[c->who[i]], c->who[i], "did not answer in time",
					  now + KVRT_LSOCK_BACKOFF_MS * 1000000ull);
			ok = false;
			break;
		}
		int ms = (int)((deadline - now + 999999) / 1000000);
		int pr = poll(c->pfd, np, ms);
		if (pr < 0 && errno != EINTR) {
			for (uint32_t i = 0; i < np; i++)
				rank_down(&c->r[c->who[i]], c->who[i], "could not be polled", 0);
			ok = false;
			break;
		}
		for (uint32_t i = 0; pr > 0 && i < np; i++)
			if (c->pfd[i].revents)
				rank_read(c, &c->r[c->who[i]], c->who[i]);
	}
	for (uint32_t k = 0; k < c->n && ok; k++)
		ok = c->r[k].answered;
	return ok;
}

int kvrt_lsock_client_lookup(struct kvrt_lsock_client *c, uint64_t req_id, uint64_t ns_hash,
			     const uint32_t *tokens, uint32_t n, struct kvrt_lookup_result *out)
{
	memset(out, 0, sizeof(*out));
	if (n > KVRT_LSOCK_MAX_TOKENS)
		return -EINVAL;
	uint64_t start = kvrt_now_ns(), deadline = start + c->timeout_ns;
	size_t need = KVRT_LSOCK_HDR + 28u + 4u * (size_t)n;
	if (need > c->cap) {
		uint8_t *b = realloc(c->buf, need);
		if (!b)
			return -ENOMEM;
		c->buf = b;
		c->cap = need;
	}
	size_t len = kvrt_lsock_encode_lookup(c->buf, c->cap, ++c->seq, req_id, ns_hash, tokens, n);
	bool ok = ask_all(c, len, start, deadline);
	bool later = false;
	for (uint32_t k = 0; k < c->n && ok; k++)
		later |= c->r[k].inprogress;
	if (!ok)
		return -EHOSTDOWN;
	if (later)
		return -EINPROGRESS; /* ask every rank again on a later pass */
	*out = c->r[0].res;
	for (uint32_t k = 1; k < c->n; k++) {
		const struct kvrt_lookup_result *x = &c->r[k].res;
		out->tokens_now = x->tokens_now < out->tokens_now ? x->tokens_now : out->tokens_now;
		out->tokens = x->tokens < out->tokens ? x->tokens : out->tokens;
		out->chunks_now = x->chunks_now < out->chunks_now ? x->chunks_now : out->chunks_now;
		out->chunks = x->chunks < out->chunks ? x->chunks : out->chunks;
	}
	return 0;
}

void kvrt_lsock_client_release(struct kvrt_lsock_client *c, uint64_t req_id)
{
	uint8_t b[KVRT_LSOCK_RELEASE_BYTES];
	size_t len = kvrt_lsock_encode_release(b, sizeof b, req_id);
	for (uint32_t k = 0; k < c->n; k++) {
		struct _rank *r = &c->r[k];
		if (r->fd < 0)
			continue;
		ssize_t w = send(r->fd, b, len, MSG_NOSIGNAL | MSG_DONTWAIT);
		if (w != (ssize_t)len) /* a partial frame would break the stream */
			rank_down(r, k, "took no release", 0);
	}
}

int kvrt_lsock_client_reset(struct kvrt_lsock_client *c, uint32_t timeout_ms, uint64_t *dropped,
			    uint64_t *kept)
{
	if (dropped)
		*dropped = 0;
	if (kept)
		*kept = 0;
	if (c->cap < KVRT_LSOCK_RELEASE_BYTES) {
		uint8_t *b = realloc(c->buf, KVRT_LSOCK_RELEASE_BYTES);
		if (!b)
			return -ENOMEM;
		c->buf = b;
		c->cap = KVRT_LSOCK_RELEASE_BYTES;
	}
	uint64_t start = kvrt_now_ns();
	size_t len = kvrt_lsock_encode_reset(c->buf, c->cap, ++c->seq);
	if (!ask_all(c, len, start, start + (uint64_t)(timeout_ms ? timeout_ms : 1) * 1000000ull))
		return -EHOSTDOWN;
	for (uint32_t k = 0; k < c->n; k++) {
		if (dropped)
			*dropped += c->r[k].res.tokens;
		if (kept)
			*kept += c->r[k].res.chunks;
	}
	return 0;
}
