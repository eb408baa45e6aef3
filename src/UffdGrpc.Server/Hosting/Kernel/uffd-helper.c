/*
 * uffd-helper: the process of one kernel-backed address space of the UffdGrpc server.
 *
 * The server writes request frames on stdin; the helper performs each one as the REAL
 * syscall or ioctl in its own address space and writes a reply frame on stdout. Accesses run
 * on the helper's own threads (one pthread per simulated thread), so an access that faults
 * on a registered range really sleeps in handle_userfault until a handler resolves it; the
 * reply comes when the access ends. One event thread sleeps in poll() on the uffds (after
 * UFFDIO_API) and a control eventfd, reads each uffd_msg as the kernel queues it and writes
 * it as an event frame. Nothing polls with a timeout.
 *
 * Frames (native byte order, x86-64):
 *   request: u32 len (bytes after this field), u32 id, u32 op, u32 pad, u64 a[8], data
 *   reply:   u32 len, u32 id, u32 kind (1 reply, 2 event), i32 err, u64 r[6], data
 * The server kills the helper (SIGKILL) when the address space is destroyed; the helper
 * also dies with the server (PR_SET_PDEATHSIG) and exits when stdin ends.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef MAP_FIXED_NOREPLACE
#define MAP_FIXED_NOREPLACE 0x100000
#endif
/* 6.7+ ioctls the build host's headers may lack (include/uapi/linux/userfaultfd.h). */
struct k_uffdio_move { uint64_t dst, src, len, mode; int64_t move; };
#define K_UFFDIO_MOVE _IOWR(0xAA, 0x05, struct k_uffdio_move)
struct k_uffdio_poison { struct uffdio_range range; uint64_t mode; int64_t updated; };
#define K_UFFDIO_POISON _IOWR(0xAA, 0x08, struct k_uffdio_poison)
#define SENTINEL ((int64_t)0x7eadbeefLL)
#define PG 4096UL
#define MAX_UFFDS 256
#define MAX_THREADS 1024
#define MAX_DATA (64UL << 20)

enum { OP_MMAP = 1, OP_MUNMAP, OP_MPROTECT, OP_MADVISE, OP_UFFD_OPEN, OP_UFFD_IOCTL, OP_UFFD_CLOSE, OP_THREAD, OP_ACCESS, OP_PAGEMAP };
enum { IO_API = 1, IO_REGISTER, IO_UNREGISTER, IO_WAKE, IO_WRITEPROTECT, IO_COPY, IO_ZEROPAGE, IO_CONTINUE, IO_POISON, IO_MOVE };

struct req { uint32_t id, op, pad; uint64_t a[8]; uint8_t *data; uint32_t dlen; };

static pthread_mutex_t out_lock = PTHREAD_MUTEX_INITIALIZER;

static int write_all(int fd, const void *p, size_t n)
{
	const uint8_t *b = p;
	while (n) {
		ssize_t w = write(fd, b, n);
		if (w < 0 && errno == EINTR) continue;
		if (w <= 0) return -1;
		b += w; n -= (size_t)w;
	}
	return 0;
}

static int read_all(int fd, void *p, size_t n)
{
	uint8_t *b = p;
	while (n) {
		ssize_t r = read(fd, b, n);
		if (r < 0 && errno == EINTR) continue;
		if (r <= 0) return -1;
		b += r; n -= (size_t)r;
	}
	return 0;
}

static void reply(uint32_t id, uint32_t kind, int err, const uint64_t r[6], const void *data, uint32_t dlen)
{
	struct { uint32_t len, id, kind; int32_t err; uint64_t r[6]; } h;
	h.len = 12 + 48 + dlen; h.id = id; h.kind = kind; h.err = err;
	for (int i = 0; i < 6; i++) h.r[i] = r ? r[i] : 0;
	pthread_mutex_lock(&out_lock);
	if (write_all(1, &h, sizeof h) || (dlen && write_all(1, data, dlen))) _exit(4);
	pthread_mutex_unlock(&out_lock);
}

/* ---- uffds and the event thread ---- */
static pthread_mutex_t uffd_lock = PTHREAD_MUTEX_INITIALIZER;
static struct { int fd; int polled; } uffds[MAX_UFFDS]; /* by handle - 1; fd < 0: closed */
static int nuffds, ctl_fd;

static void *event_thread(void *arg)
{
	(void)arg;
	struct pollfd pfd[MAX_UFFDS + 1];
	int handle[MAX_UFFDS + 1];
	for (;;) {
		int n = 0;
		pfd[n].fd = ctl_fd; pfd[n].events = POLLIN; handle[n++] = 0;
		pthread_mutex_lock(&uffd_lock);
		for (int i = 0; i < nuffds; i++)
			if (uffds[i].fd >= 0 && uffds[i].polled) { pfd[n].fd = uffds[i].fd; pfd[n].events = POLLIN; handle[n++] = i + 1; }
		pthread_mutex_unlock(&uffd_lock);
		if (poll(pfd, (nfds_t)n, -1) < 0) {
			if (errno == EINTR) continue;
			_exit(5);
		}
		if (pfd[0].revents & POLLIN) { uint64_t v; if (read(ctl_fd, &v, sizeof v) < 0) { /* drained */ } }
		pthread_mutex_lock(&uffd_lock);
		for (int i = 1; i < n; i++) {
			int h = handle[i];
			/* Closed (or closed and its number reused) since poll began: not ours to read. */
			if (!pfd[i].revents || uffds[h - 1].fd != pfd[i].fd || !uffds[h - 1].polled) continue;
			struct uffd_msg m;
			while (read(pfd[i].fd, &m, sizeof m) == (ssize_t)sizeof m) {
				uint64_t r[6] = {(uint64_t)h};
				reply(0, 2, 0, r, &m, sizeof m);
			}
		}
		pthread_mutex_unlock(&uffd_lock);
	}
	return NULL;
}

static void kick(void) { uint64_t one = 1; if (write(ctl_fd, &one, sizeof one) < 0) _exit(6); }

static int uffd_fd(uint64_t h)
{
	if (h == 0 || h > (uint64_t)nuffds) return -1;
	return uffds[h - 1].fd;
}

/* ---- accesses on the helper's threads ---- */
static __thread sigjmp_buf tl_jb;
static __thread volatile int tl_active, tl_sig, tl_code;

static void on_signal(int sig, siginfo_t *si, void *uc)
{
	(void)uc;
	if (!tl_active) _exit(3);
	tl_active = 0; tl_sig = sig; tl_code = si->si_code;
	siglongjmp(tl_jb, 1);
}

/* SignalCode of the wire: 1 SEGV_MAPERR, 2 SEGV_ACCERR, 3 BUS_ADRERR, 4 BUS_MCEERR_AR, 255 other. */
static uint64_t sigcode(int sig, int code)
{
	if (sig == SIGSEGV) return code == SEGV_MAPERR ? 1 : code == SEGV_ACCERR ? 2 : 255;
	if (sig == SIGBUS) return code == BUS_ADRERR ? 3 : code == BUS_MCEERR_AR ? 4 : 255;
	return 255;
}

struct sim_thread { pthread_mutex_t m; pthread_cond_t c; struct req *work; int tid; };
static struct sim_thread *threads[MAX_THREADS];
static int nthreads;

/*
 * a: [1] addr, [2] write, [3] span (0: touch), [4] pages or length, [5] value.
 * One sigsetjmp for the whole access: a SIGSEGV or SIGBUS jumps back with `done` counting
 * the bytes (span) or pages (touch) completed before the faulting one.
 */
static void run_access(struct req *q)
{
	uintptr_t addr = q->a[1];
	int wr = (int)q->a[2], span = (int)q->a[3];
	uint64_t n = q->a[4];
	uint64_t r[6] = {0};
	uint8_t *vals = malloc(n ? n : 1);
	volatile uint64_t done = 0;
	volatile int sig = 0;
	if (!vals) _exit(7);
	if (sigsetjmp(tl_jb, 1) == 0) {
		tl_active = 1;
		for (; done < n; done++) {
			uint64_t i = done;
			volatile uint8_t *p = (volatile uint8_t *)(span ? addr + i : (addr & ~(PG - 1)) + i * PG + (addr & (PG - 1)));
			if (wr) {
				uint8_t v = span ? q->data[i] : (uint8_t)q->a[5];
				*p = v;
				vals[i] = v;
			} else {
				vals[i] = *p;
			}
		}
		tl_active = 0;
	} else {
		sig = tl_sig;
	}
	r[0] = sig ? sigcode(sig, tl_code) : 0;
	r[1] = done;
	reply(q->id, 1, 0, r, vals, span && wr ? 0 : (uint32_t)done);
	free(vals);
}

static void *thread_main(void *arg)
{
	struct sim_thread *t = arg;
	pthread_mutex_lock(&t->m);
	t->tid = (int)syscall(SYS_gettid);
	pthread_cond_broadcast(&t->c);
	pthread_mutex_unlock(&t->m);
	for (;;) {
		pthread_mutex_lock(&t->m);
		while (!t->work) pthread_cond_wait(&t->c, &t->m);
		struct req *q = t->work;
		t->work = NULL;
		pthread_mutex_unlock(&t->m);
		run_access(q);
		free(q->data);
		free(q);
	}
	return NULL;
}

/* ---- the synchronous calls ---- */
static int do_ioctl(int fd, struct req *q, uint64_t r[6])
{
	uint64_t s = q->a[3], l = q->a[4], mode = q->a[5];
	int rc;
	switch (q->a[2]) {
	case IO_API: {
		struct uffdio_api api = {.api = q->a[3], .features = q->a[4]};
		rc = ioctl(fd, UFFDIO_API, &api);
		r[0] = api.features; r[1] = api.ioctls;
		if (rc == 0) {
			pthread_mutex_lock(&uffd_lock);
			for (int i = 0; i < nuffds; i++) if (uffds[i].fd == fd) uffds[i].polled = 1;
			pthread_mutex_unlock(&uffd_lock);
			kick();
		}
		return rc;
	}
	case IO_REGISTER: {
		struct uffdio_register g = {.range = {s, l}, .mode = mode};
		rc = ioctl(fd, UFFDIO_REGISTER, &g);
		r[0] = g.ioctls;
		return rc;
	}
	case IO_UNREGISTER: { struct uffdio_range g = {s, l}; return ioctl(fd, UFFDIO_UNREGISTER, &g); }
	case IO_WAKE: { struct uffdio_range g = {s, l}; return ioctl(fd, UFFDIO_WAKE, &g); }
	case IO_WRITEPROTECT: {
		struct uffdio_writeprotect g = {.range = {s, l}, .mode = mode};
		return ioctl(fd, UFFDIO_WRITEPROTECT, &g);
	}
	case IO_COPY: {
		/* The source: the request's bytes, then a PROT_NONE page (a longer copy faults: EFAULT). */
		uint64_t dl = q->dlen, span = (dl + PG - 1) & ~(PG - 1);
		uint8_t *buf = mmap(NULL, span + PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (buf == MAP_FAILED) return -1;
		if (q->a[7]) memset(buf, (int)q->a[6], dl); /* fill */
		else if (dl) memcpy(buf, q->data, dl);
		mprotect(buf + span, PG, PROT_NONE);
		struct uffdio_copy g = {.dst = s, .src = (uintptr_t)buf, .len = l, .mode = mode, .copy = SENTINEL};
		rc = ioctl(fd, UFFDIO_COPY, &g);
		int e = errno;
		r[0] = (uint64_t)g.copy;
		munmap(buf, span + PG);
		errno = e;
		return rc;
	}
	case IO_ZEROPAGE: {
		struct uffdio_zeropage g = {.range = {s, l}, .mode = mode, .zeropage = SENTINEL};
		rc = ioctl(fd, UFFDIO_ZEROPAGE, &g); r[0] = (uint64_t)g.zeropage; return rc;
	}
	case IO_CONTINUE: {
		struct uffdio_continue g = {.range = {s, l}, .mode = mode, .mapped = SENTINEL};
		rc = ioctl(fd, UFFDIO_CONTINUE, &g); r[0] = (uint64_t)g.mapped; return rc;
	}
	case IO_POISON: {
		struct k_uffdio_poison g = {.range = {s, l}, .mode = mode, .updated = SENTINEL};
		rc = ioctl(fd, K_UFFDIO_POISON, &g); r[0] = (uint64_t)g.updated; return rc;
	}
	case IO_MOVE: {
		struct k_uffdio_move g = {.dst = s, .src = q->a[6], .len = l, .mode = mode, .move = SENTINEL};
		rc = ioctl(fd, K_UFFDIO_MOVE, &g); r[0] = (uint64_t)g.move; return rc;
	}
	default:
		r[0] = (uint64_t)SENTINEL;
		errno = ENOTTY;
		return -1;
	}
}

static void handle(struct req *q)
{
	uint64_t r[6] = {0};
	int rc = 0, fd;
	void *p;
	switch (q->op) {
	case OP_MMAP: {
		/* a: addr, len, prot, shared, populate */
		int fl = MAP_FIXED_NOREPLACE | MAP_ANONYMOUS | (q->a[3] ? MAP_SHARED : MAP_PRIVATE) | (q->a[4] ? MAP_POPULATE : 0);
		p = mmap((void *)q->a[0], q->a[1], (int)q->a[2], fl, -1, 0);
		if (p == MAP_FAILED) rc = -1;
		else if ((uint64_t)p != q->a[0]) { munmap(p, q->a[1]); rc = -1; errno = EEXIST; }
		r[0] = rc ? 0 : (uint64_t)p;
		break;
	}
	case OP_MUNMAP: rc = munmap((void *)q->a[0], q->a[1]); break;
	case OP_MPROTECT: rc = mprotect((void *)q->a[0], q->a[1], (int)q->a[2]); break;
	case OP_MADVISE: rc = madvise((void *)q->a[0], q->a[1], (int)q->a[2]); break;
	case OP_UFFD_OPEN:
		/* Always O_NONBLOCK underneath (userfaultfd_poll gives POLLERR on a blocking uffd). */
		fd = (int)syscall(SYS_userfaultfd, (int)q->a[0] | O_NONBLOCK);
		if (fd < 0) { rc = -1; break; }
		pthread_mutex_lock(&uffd_lock);
		if (nuffds == MAX_UFFDS) { close(fd); rc = -1; errno = EMFILE; }
		else { uffds[nuffds].fd = fd; uffds[nuffds].polled = 0; r[0] = (uint64_t)++nuffds; }
		pthread_mutex_unlock(&uffd_lock);
		break;
	case OP_UFFD_IOCTL:
		fd = uffd_fd(q->a[0]);
		if (fd < 0) { rc = -1; errno = EBADF; r[0] = (uint64_t)SENTINEL; break; }
		rc = do_ioctl(fd, q, r);
		break;
	case OP_UFFD_CLOSE:
		pthread_mutex_lock(&uffd_lock);
		fd = uffd_fd(q->a[0]);
		if (fd < 0) { rc = -1; errno = EBADF; }
		else { uffds[q->a[0] - 1].fd = -1; rc = close(fd); }
		pthread_mutex_unlock(&uffd_lock);
		kick();
		break;
	case OP_THREAD: {
		if (nthreads == MAX_THREADS) { rc = -1; errno = EAGAIN; break; }
		struct sim_thread *t = calloc(1, sizeof *t);
		pthread_t pt;
		pthread_mutex_init(&t->m, NULL);
		pthread_cond_init(&t->c, NULL);
		if ((errno = pthread_create(&pt, NULL, thread_main, t)) != 0) { rc = -1; free(t); break; }
		pthread_detach(pt);
		pthread_mutex_lock(&t->m);
		while (!t->tid) pthread_cond_wait(&t->c, &t->m);
		pthread_mutex_unlock(&t->m);
		threads[nthreads] = t;
		r[0] = (uint64_t)++nthreads;
		r[1] = (uint64_t)t->tid;
		break;
	}
	case OP_ACCESS: {
		uint64_t h = q->a[0];
		if (h == 0 || h > (uint64_t)nthreads) { rc = -1; errno = ESRCH; break; }
		struct sim_thread *t = threads[h - 1];
		pthread_mutex_lock(&t->m);
		t->work = q;
		pthread_cond_signal(&t->c);
		pthread_mutex_unlock(&t->m);
		return; /* the thread replies and frees q */
	}
	case OP_PAGEMAP: {
		uint64_t n = q->a[1];
		uint64_t *v = calloc(n ? n : 1, 8);
		int pm = open("/proc/self/pagemap", O_RDONLY);
		if (pm < 0 || pread(pm, v, n * 8, (off_t)(q->a[0] / PG * 8)) != (ssize_t)(n * 8)) rc = -1;
		int e = errno;
		if (pm >= 0) close(pm);
		reply(q->id, 1, rc ? e : 0, r, v, rc ? 0 : (uint32_t)(n * 8));
		free(v);
		free(q->data);
		free(q);
		return;
	}
	default: rc = -1; errno = ENOSYS;
	}
	reply(q->id, 1, rc ? errno : 0, r, NULL, 0);
	free(q->data);
	free(q);
}

int main(void)
{
	prctl(PR_SET_PDEATHSIG, SIGKILL);
	if (getppid() == 1) return 1;
	signal(SIGPIPE, SIG_IGN);
	struct sigaction sa = {0};
	sa.sa_sigaction = on_signal;
	sa.sa_flags = SA_SIGINFO | SA_NODEFER;
	sigaction(SIGSEGV, &sa, NULL);
	sigaction(SIGBUS, &sa, NULL);
	ctl_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	pthread_t ev;
	if (ctl_fd < 0 || pthread_create(&ev, NULL, event_thread, NULL)) return 1;
	/* Hello: the lowest address the helper's own mappings use (the server keeps requests below it). */
	uint64_t low = ~0ULL;
	FILE *maps = fopen("/proc/self/maps", "r");
	unsigned long s, e;
	while (maps && fscanf(maps, "%lx-%lx%*[^\n]", &s, &e) == 2) if (s < low) low = s;
	if (maps) fclose(maps);
	uint64_t hello[6] = {low, (uint64_t)getpid()};
	reply(0, 1, 0, hello, NULL, 0);
	for (;;) {
		uint32_t len;
		if (read_all(0, &len, 4)) return 0;
		struct req *q = calloc(1, sizeof *q);
		if (!q || len < 76 || len - 76 > MAX_DATA || read_all(0, &q->id, 12) || read_all(0, q->a, 64)) return 8;
		q->dlen = len - 76;
		q->data = malloc(q->dlen ? q->dlen : 1);
		if (!q->data || (q->dlen && read_all(0, q->data, q->dlen))) return 8;
		handle(q);
	}
}
