/*
 * kuffd - ground-truth harness for memory protection and userfaultfd-wp.
 *
 * Reads a scenario script (one command per line) and runs it against the
 * running kernel.  Every observable result is printed as one canonical trace
 * line.  Addresses never appear in the trace: they are printed as
 * "NAME PAGE[+OFFSET]" relative to the named mapping.  See README.md for the
 * command language.
 *
 * Threads and processes:
 *   main     reads the script, runs ioctls/syscalls itself, prints results.
 *   worker   a thread that performs memory accesses (they may block in a
 *            userfault or raise a signal) and "async" commands.
 *   handler  a thread that reads the uffd(s) and applies the handler policy.
 *   child    after "fork": the child process runs "child:" commands.
 * After every command main "settles": it waits until every executor is idle
 * or asleep in a userfault, the handler is idle and no uffd has unread
 * messages.  This makes the trace deterministic.
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sched.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* ------------------------------------------------------------------ */
/* Constants missing from older uapi headers (values are uapi facts).  */
/* ------------------------------------------------------------------ */
#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1ULL << 13)
#endif
#ifndef UFFD_FEATURE_POISON
#define UFFD_FEATURE_POISON (1ULL << 14)
#endif
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1ULL << 15)
#endif
#ifndef UFFD_FEATURE_MOVE
#define UFFD_FEATURE_MOVE (1ULL << 16)
#endif
#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif
#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(0xAA, 0x00)
#endif
#ifndef UFFDIO_CONTINUE_MODE_WP
#define UFFDIO_CONTINUE_MODE_WP (1ULL << 1)
#endif

struct k_uffdio_move {
	uint64_t dst, src, len, mode;
	int64_t move;
};
#define K_UFFDIO_MOVE _IOWR(0xAA, 0x05, struct k_uffdio_move)
#define K_UFFDIO_MOVE_MODE_DONTWAKE (1ULL << 0)
#define K_UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES (1ULL << 1)

struct k_uffdio_poison {
	struct uffdio_range range;
	uint64_t mode;
	int64_t updated;
};
#define K_UFFDIO_POISON _IOWR(0xAA, 0x08, struct k_uffdio_poison)

struct k_page_region {
	uint64_t start, end, categories;
};
struct k_pm_scan_arg {
	uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages;
	uint64_t category_inverted, category_mask, category_anyof_mask, return_mask;
};
#define K_PAGEMAP_SCAN _IOWR('f', 16, struct k_pm_scan_arg)
#define K_PM_SCAN_WP_MATCHING (1ULL << 0)
#define K_PM_SCAN_CHECK_WPASYNC (1ULL << 1)

#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25
#endif
#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22
#define MADV_POPULATE_WRITE 23
#endif
#ifndef MAP_FIXED_NOREPLACE
#define MAP_FIXED_NOREPLACE 0x100000
#endif

#define PG 4096UL
#define PMD_SZ (2UL << 20)
#define UNTOUCHED_SENTINEL ((int64_t)0x7eadbeefLL)

/* pagemap bits */
#define PM_SOFT_DIRTY (1ULL << 55)
#define PM_EXCLUSIVE (1ULL << 56)
#define PM_UFFD_WP (1ULL << 57)
#define PM_GUARD (1ULL << 58)
#define PM_FILE (1ULL << 61)
#define PM_SWAP (1ULL << 62)
#define PM_PRESENT (1ULL << 63)
#define PM_PFN_MASK ((1ULL << 55) - 1)
/* /proc/kpageflags bits */
#define KPF_THP 22
#define KPF_ZERO_PAGE 24

/* ------------------------------------------------------------------ */
/* Small utilities                                                     */
/* ------------------------------------------------------------------ */
static const char *errname(int e)
{
	static __thread char buf[16];
	switch (e) {
	case 0: return "ok";
	case EPERM: return "EPERM";
	case ENOENT: return "ENOENT";
	case ESRCH: return "ESRCH";
	case EINTR: return "EINTR";
	case EIO: return "EIO";
	case ENXIO: return "ENXIO";
	case E2BIG: return "E2BIG";
	case EBADF: return "EBADF";
	case EAGAIN: return "EAGAIN";
	case ENOMEM: return "ENOMEM";
	case EACCES: return "EACCES";
	case EFAULT: return "EFAULT";
	case EBUSY: return "EBUSY";
	case EEXIST: return "EEXIST";
	case ENODEV: return "ENODEV";
	case EINVAL: return "EINVAL";
	case ENOSPC: return "ENOSPC";
	case ESPIPE: return "ESPIPE";
	case ERANGE: return "ERANGE";
	case ENOSYS: return "ENOSYS";
	case ENOTTY: return "ENOTTY";
	case EOPNOTSUPP: return "EOPNOTSUPP";
	case EHWPOISON: return "EHWPOISON";
	}
	snprintf(buf, sizeof buf, "E#%d", e);
	return buf;
}

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static pid_t gettid_(void) { return (pid_t)syscall(SYS_gettid); }

/* ------------------------------------------------------------------ */
/* Output                                                              */
/* ------------------------------------------------------------------ */
static pthread_mutex_t out_mu = PTHREAD_MUTEX_INITIALIZER;
static __thread int tl_out_fd = -1;   /* -1: stdout (caller holds out_mu) */
static __thread const char *tl_prefix; /* executor: prefix for result lines */

/* Emit one line from command code: to stdout (main holds out_mu) or to the
 * executor's result pipe. */
static void emit(const char *fmt, ...)
{
	char buf[8192];
	va_list ap;
	int n = 0;
	if (tl_prefix && strcmp(fmt, "\x01")) n = snprintf(buf, sizeof buf, "%s: ", tl_prefix);
	va_start(ap, fmt);
	int m = vsnprintf(buf + n, sizeof buf - 2 - n, fmt, ap);
	va_end(ap);
	if (m < 0) return;
	n += m;
	if (n > (int)sizeof buf - 2) n = sizeof buf - 2;
	buf[n++] = '\n';
	if (tl_out_fd < 0) {
		fwrite(buf, 1, n, stdout);
		fflush(stdout);
	} else {
		ssize_t w = write(tl_out_fd, buf, n);
		(void)w;
	}
}

/* Deferred output of the handler thread. The handler never blocks on out_mu:
 * main may hold out_mu across a syscall (fork, mremap, munmap, madvise) that
 * waits until the handler has read a non-cooperative event. Handler lines are
 * queued in order and printed by whoever holds out_mu next. A resolution line
 * reserves its slot BEFORE the resolving ioctl, so that a line reported by the
 * thread it wakes can never overtake it. */
#define PQ 4096
static struct { char *text; bool ready; } pq[PQ];
static unsigned pq_head, pq_tail;
static pthread_mutex_t pq_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pq_cv = PTHREAD_COND_INITIALIZER;

static unsigned pq_reserve(void)
{
	pthread_mutex_lock(&pq_mu);
	unsigned i = pq_tail++;
	pq[i % PQ].ready = false;
	pq[i % PQ].text = NULL;
	pthread_mutex_unlock(&pq_mu);
	return i;
}

static void pq_fill(unsigned i, const char *text)
{
	pthread_mutex_lock(&pq_mu);
	pq[i % PQ].text = strdup(text);
	pq[i % PQ].ready = true;
	pthread_cond_broadcast(&pq_cv);
	pthread_mutex_unlock(&pq_mu);
}

/* caller holds out_mu */
static void pq_flush_locked(void)
{
	pthread_mutex_lock(&pq_mu);
	while (pq_head != pq_tail) {
		while (!pq[pq_head % PQ].ready) pthread_cond_wait(&pq_cv, &pq_mu);
		fputs(pq[pq_head % PQ].text, stdout);
		fputc('\n', stdout);
		free(pq[pq_head % PQ].text);
		pq_head++;
	}
	pthread_mutex_unlock(&pq_mu);
	fflush(stdout);
}

static void pq_try_flush(void)
{
	if (!pthread_mutex_trylock(&out_mu)) {
		pq_flush_locked();
		pthread_mutex_unlock(&out_mu);
	}
}

/* Print a line from main outside a command (settle); handler lines first. */
static void outf(const char *fmt, ...)
{
	char buf[8192];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(buf, sizeof buf, fmt, ap);
	va_end(ap);
	pthread_mutex_lock(&out_mu);
	pq_flush_locked();
	fputs(buf, stdout);
	fputc('\n', stdout);
	fflush(stdout);
	pthread_mutex_unlock(&out_mu);
}

/* handle_msg output: from main (out_mu held) or from the handler thread */
static __thread bool tl_holds_out;
#define NO_SLOT (~0U)
static unsigned hslot(void) { return tl_holds_out ? NO_SLOT : pq_reserve(); }
static void hput(unsigned slot, const char *fmt, ...)
{
	char buf[8192];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(buf, sizeof buf, fmt, ap);
	va_end(ap);
	if (tl_holds_out) {
		emit("%s", buf);
		return;
	}
	if (slot == NO_SLOT) slot = pq_reserve();
	pq_fill(slot, buf);
	pq_try_flush();
}
#define hout(...) hput(NO_SLOT, __VA_ARGS__)

/* ------------------------------------------------------------------ */
/* Named mappings                                                      */
/* ------------------------------------------------------------------ */
enum kind { K_ANON, K_SHMEM, K_FILE };
struct mapping {
	char name[32];
	uintptr_t base;
	size_t len;
	enum kind kind;
	bool shared;
	int fd;     /* memfd / file for shmem and file kinds */
	off_t off;  /* file offset of base */
};
#define MAXMAP 64
static struct mapping maps[MAXMAP];
static volatile int nmaps;
static uintptr_t arena_next;

static struct mapping *find_map(const char *name)
{
	for (int i = 0; i < nmaps; i++)
		if (!strcmp(maps[i].name, name)) return &maps[i];
	return NULL;
}

/* addr -> "NAME PAGE[+OFF]" (latest mapping containing addr wins) */
static void addr_name(uintptr_t a, char *buf, size_t n)
{
	for (int i = nmaps - 1; i >= 0; i--) {
		struct mapping *m = &maps[i];
		if (a >= m->base && a < m->base + m->len) {
			uintptr_t d = a - m->base;
			if (d % PG)
				snprintf(buf, n, "%s %lu+%lu", m->name, d / PG, d % PG);
			else
				snprintf(buf, n, "%s %lu", m->name, d / PG);
			return;
		}
	}
	/* one past the end of a mapping (e.g. PAGEMAP_SCAN walk_end) */
	for (int i = nmaps - 1; i >= 0; i--)
		if (a == maps[i].base + maps[i].len) {
			snprintf(buf, n, "%s %lu", maps[i].name, maps[i].len / PG);
			return;
		}
	if (a == 0) snprintf(buf, n, "0");
	else snprintf(buf, n, "?%#lx", (unsigned long)a);
}

/* Parse "N" or "N+B" (pages plus bytes). */
static bool parse_pages(const char *s, uint64_t *bytes)
{
	char *end;
	errno = 0;
	unsigned long long p = strtoull(s, &end, 0);
	if (errno || end == s) return false;
	uint64_t b = 0;
	if (*end == '+') {
		char *e2;
		b = strtoull(end + 1, &e2, 0);
		if (e2 == end + 1 || *e2) return false;
	} else if (*end) {
		return false;
	}
	*bytes = p * PG + b;
	return true;
}

static bool parse_loc(const char *name, const char *pg, uintptr_t *addr, struct mapping **mp)
{
	struct mapping *m = find_map(name);
	uint64_t off;
	if (!m || !parse_pages(pg, &off)) return false;
	*addr = m->base + off;
	if (mp) *mp = m;
	return true;
}

static bool parse_byte(const char *s, uint8_t *b)
{
	char *end;
	unsigned long v = strtoul(s, &end, 0);
	if (end == s || *end || v > 255) return false;
	*b = (uint8_t)v;
	return true;
}

static int parse_prot(const char *s, int *prot)
{
	int p = 0;
	if (!strcmp(s, "none") || !strcmp(s, "-")) { *prot = PROT_NONE; return 1; }
	for (const char *c = s; *c; c++) {
		if (*c == 'r') p |= PROT_READ;
		else if (*c == 'w') p |= PROT_WRITE;
		else if (*c == 'x') p |= PROT_EXEC;
		else if (*c == '-') continue;
		else return 0;
	}
	*prot = p;
	return 1;
}

/* ------------------------------------------------------------------ */
/* uffd table and handler state                                        */
/* ------------------------------------------------------------------ */
struct uffd_ent {
	int fd;
	bool open;
	bool api_done;
	bool blocking;     /* opened without O_NONBLOCK: never polled by the handler */
	uint64_t features; /* requested */
};
#define MAXUFFD 16
static struct uffd_ent uffds[MAXUFFD];
static int n_uffds;
static int cur_uffd = -1;

enum { POL_OFF = 1, POL_UNWP = 2, POL_COPY = 4, POL_COPYWP = 8, POL_ZERO = 16,
       POL_CONT = 32, POL_CONTWP = 64, POL_WAKE = 128 };
static pthread_mutex_t st_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t st_cv = PTHREAD_COND_INITIALIZER;
static int policy;            /* POL_* bits; 0 = log only */
static uint8_t policy_byte;
static int handler_gen, handler_seen_gen;
static bool handler_busy, handler_quit;
static int ctl_efd = -1;
static pid_t main_tid, worker_tid, child_pid;

/* ------------------------------------------------------------------ */
/* Signals for accesses                                                */
/* ------------------------------------------------------------------ */
static __thread sigjmp_buf tl_jb;
static __thread volatile int tl_jb_active;
static __thread volatile int tl_sig, tl_code;
static __thread volatile uintptr_t tl_addr;

static void on_signal(int sig, siginfo_t *si, void *uc)
{
	(void)uc;
	if (tl_jb_active) {
		tl_jb_active = 0;
		tl_sig = sig;
		tl_code = si->si_code;
		tl_addr = (uintptr_t)si->si_addr;
		siglongjmp(tl_jb, 1);
	}
	static const char msg[] = "FATAL unexpected signal outside an access\n";
	ssize_t w = write(1, msg, sizeof msg - 1);
	(void)w;
	_exit(3);
}

static void on_alarm(int sig)
{
	(void)sig;
	static const char msg[] = "TIMEOUT scenario watchdog\n";
	ssize_t w = write(1, msg, sizeof msg - 1);
	(void)w;
	_exit(2);
}

static const char *sigdesc(int sig, int code)
{
	static __thread char buf[64];
	const char *c = "?";
	if (sig == SIGSEGV) {
		c = code == SEGV_MAPERR ? "SEGV_MAPERR" : code == SEGV_ACCERR ? "SEGV_ACCERR" : "other";
		snprintf(buf, sizeof buf, "SIGSEGV %s", c);
	} else if (sig == SIGBUS) {
		c = code == BUS_ADRERR ? "BUS_ADRERR" : code == BUS_MCEERR_AR ? "BUS_MCEERR_AR" :
		    code == BUS_OBJERR ? "BUS_OBJERR" : "other";
		snprintf(buf, sizeof buf, "SIGBUS %s", c);
	} else {
		snprintf(buf, sizeof buf, "SIG%d code=%d", sig, code);
	}
	return buf;
}

/* Returns 0 on success, or the signal number. */
static int access_byte(uintptr_t addr, bool wr, uint8_t val, uint8_t *out)
{
	if (sigsetjmp(tl_jb, 1))
		return tl_sig;
	tl_jb_active = 1;
	if (wr)
		*(volatile uint8_t *)addr = val;
	else
		*out = *(volatile uint8_t *)addr;
	tl_jb_active = 0;
	return 0;
}

/* ------------------------------------------------------------------ */
/* Names of bits                                                       */
/* ------------------------------------------------------------------ */
static const struct { const char *name; uint64_t bit; } feat_names[] = {
	{"wp", UFFD_FEATURE_PAGEFAULT_FLAG_WP},
	{"pagefault_flag_wp", UFFD_FEATURE_PAGEFAULT_FLAG_WP},
	{"fork", UFFD_FEATURE_EVENT_FORK},
	{"event_fork", UFFD_FEATURE_EVENT_FORK},
	{"remap", UFFD_FEATURE_EVENT_REMAP},
	{"event_remap", UFFD_FEATURE_EVENT_REMAP},
	{"remove", UFFD_FEATURE_EVENT_REMOVE},
	{"event_remove", UFFD_FEATURE_EVENT_REMOVE},
	{"missing_hugetlbfs", UFFD_FEATURE_MISSING_HUGETLBFS},
	{"missing_shmem", UFFD_FEATURE_MISSING_SHMEM},
	{"unmap", UFFD_FEATURE_EVENT_UNMAP},
	{"event_unmap", UFFD_FEATURE_EVENT_UNMAP},
	{"sigbus", UFFD_FEATURE_SIGBUS},
	{"thread_id", UFFD_FEATURE_THREAD_ID},
	{"minor_hugetlbfs", UFFD_FEATURE_MINOR_HUGETLBFS},
	{"minor_shmem", UFFD_FEATURE_MINOR_SHMEM},
	{"exact_address", UFFD_FEATURE_EXACT_ADDRESS},
	{"wp_hugetlbfs_shmem", UFFD_FEATURE_WP_HUGETLBFS_SHMEM},
	{"wp_unpopulated", UFFD_FEATURE_WP_UNPOPULATED},
	{"poison", UFFD_FEATURE_POISON},
	{"wp_async", UFFD_FEATURE_WP_ASYNC},
	{"move", UFFD_FEATURE_MOVE},
};

static const char *ioctl_bit_names[64] = {
	[0] = "REGISTER", [1] = "UNREGISTER", [2] = "WAKE", [3] = "COPY",
	[4] = "ZEROPAGE", [5] = "MOVE", [6] = "WRITEPROTECT", [7] = "CONTINUE",
	[8] = "POISON", [63] = "API",
};

static void fmt_ioctls(uint64_t v, char *buf, size_t n)
{
	buf[0] = 0;
	size_t len = 0;
	for (int i = 0; i < 64; i++) {
		if (!(v & (1ULL << i))) continue;
		char tmp[32];
		if (ioctl_bit_names[i]) snprintf(tmp, sizeof tmp, "%s", ioctl_bit_names[i]);
		else snprintf(tmp, sizeof tmp, "bit%d", i);
		len += snprintf(buf + len, n - len, "%s%s", len ? "|" : "", tmp);
		if (len >= n) break;
	}
	if (!len) snprintf(buf, n, "0");
}

static const char *cat_names[] = {"wpallowed", "written", "file", "present", "swapped",
				  "pfnzero", "huge", "soft-dirty", "guard"};

static void fmt_cats(uint64_t v, char *buf, size_t n)
{
	size_t len = 0;
	buf[0] = 0;
	for (int i = 0; i < 64; i++) {
		if (!(v & (1ULL << i))) continue;
		if (i < 9) len += snprintf(buf + len, n - len, "%s%s", len ? "|" : "", cat_names[i]);
		else len += snprintf(buf + len, n - len, "%sbit%d", len ? "|" : "", i);
		if (len >= n) break;
	}
	if (!len) snprintf(buf, n, "-");
}

static bool parse_cats(const char *s, uint64_t *out)
{
	uint64_t v = 0;
	char tmp[256];
	snprintf(tmp, sizeof tmp, "%s", s);
	if (!strcmp(tmp, "0") || !strcmp(tmp, "-")) { *out = 0; return true; }
	if (!strcmp(tmp, "all")) { *out = 0x1ff; return true; }
	for (char *save, *t = strtok_r(tmp, "|,", &save); t; t = strtok_r(NULL, "|,", &save)) {
		bool found = false;
		for (int i = 0; i < 9; i++)
			if (!strcmp(t, cat_names[i])) { v |= 1ULL << i; found = true; }
		if (!found && !strncmp(t, "bit", 3)) { v |= 1ULL << atoi(t + 3); found = true; }
		if (!found) {
			char *e;
			unsigned long long x = strtoull(t, &e, 0);
			if (*e) return false;
			v |= x;
		}
	}
	*out = v;
	return true;
}

/* ------------------------------------------------------------------ */
/* pagemap                                                             */
/* ------------------------------------------------------------------ */
static int kpf_fd = -1;

static uint64_t kpageflags_of(uint64_t pfn)
{
	if (kpf_fd < 0) kpf_fd = open("/proc/kpageflags", O_RDONLY | O_CLOEXEC);
	uint64_t f = 0;
	if (kpf_fd < 0 || pread(kpf_fd, &f, 8, pfn * 8) != 8) return 0;
	return f;
}

static void fmt_pm(uint64_t e, char *buf, size_t n)
{
	size_t len = 0;
	buf[0] = 0;
#define ADD(cond, s) do { if (cond) len += snprintf(buf + len, n - len, "%s%s", len ? " " : "", s); } while (0)
	ADD(e & PM_PRESENT, "present");
	ADD(e & PM_SWAP, "swapped");
	ADD(e & PM_FILE, "file");
	ADD(e & PM_EXCLUSIVE, "exclusive");
	ADD(e & PM_UFFD_WP, "uffd-wp");
	ADD(e & PM_SOFT_DIRTY, "soft-dirty");
	ADD(e & PM_GUARD, "guard");
	if ((e & PM_PRESENT) && (e & PM_PFN_MASK)) {
		uint64_t kf = kpageflags_of(e & PM_PFN_MASK);
		ADD(kf & (1ULL << KPF_ZERO_PAGE), "zero");
		ADD(kf & (1ULL << KPF_THP), "thp");
	}
#undef ADD
	if (!len) snprintf(buf, n, "none");
}

static int read_pagemap(uintptr_t addr, size_t npages, uint64_t *out)
{
	int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
	if (fd < 0) return errno;
	size_t want = npages * 8, got = 0;
	while (got < want) {
		ssize_t r = pread(fd, (char *)out + got, want - got, (addr / PG) * 8 + got);
		if (r <= 0) { int e = r < 0 ? errno : EIO; close(fd); return e; }
		got += r;
	}
	close(fd);
	return 0;
}

/* page identity labels, shared with forked children */
struct pfn_labels { int n; uint64_t pfn[1024]; };
static struct pfn_labels *labels;

static int pfn_label(uint64_t pfn)
{
	for (int i = 0; i < labels->n; i++)
		if (labels->pfn[i] == pfn) return i + 1;
	if (labels->n < 1024) labels->pfn[labels->n++] = pfn;
	return labels->n;
}

/* ------------------------------------------------------------------ */
/* Executors (worker thread, child process)                            */
/* ------------------------------------------------------------------ */
struct executor {
	const char *label;
	bool alive;
	pid_t pid, tid;
	int cmd_wr, res_rd;
	int pending;
	bool blocked_reported;
	char curop[512];
	char lbuf[16384];
	size_t llen;
};
static struct executor ex_worker = {.label = "worker"};
static struct executor ex_child = {.label = "child"};
static bool in_child;
static int pipe_k[2] = {-1, -1}; /* pipe used for kernel-origin accesses */

static bool tid_in_userfault(pid_t pid, pid_t tid)
{
	char path[128], buf[8192];
	snprintf(path, sizeof path, "/proc/%d/task/%d/stat", pid, tid);
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0) return false;
	ssize_t r = read(fd, buf, sizeof buf - 1);
	close(fd);
	if (r <= 0) return false;
	buf[r] = 0;
	char *p = strrchr(buf, ')');
	if (!p || !p[1] || !p[2]) return false;
	char st = p[2];
	if (st != 'S' && st != 'D') return false;
	snprintf(path, sizeof path, "/proc/%d/task/%d/stack", pid, tid);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0) return false;
	r = read(fd, buf, sizeof buf - 1);
	close(fd);
	if (r <= 0) return false;
	buf[r] = 0;
	return strstr(buf, "userfault") != NULL;
}

/* Sends line to the executor; shown is what "blocked" lines name (line itself when NULL). */
static void exec_send_as(struct executor *ex, const char *line, const char *shown)
{
	char buf[1024];
	int n = snprintf(buf, sizeof buf, "%s\n", line);
	ex->pending++;
	ex->blocked_reported = false;
	snprintf(ex->curop, sizeof ex->curop, "%s", shown ? shown : line);
	if (write(ex->cmd_wr, buf, n) != n)
		emit("FATAL cannot send to %s", ex->label);
}

static void exec_send(struct executor *ex, const char *line) { exec_send_as(ex, line, NULL); }

/* Drain result lines from an executor; returns true if something arrived. */
static bool exec_drain(struct executor *ex)
{
	bool any = false;
	if (!ex->alive) return false;
	for (;;) {
		ssize_t r = read(ex->res_rd, ex->lbuf + ex->llen, sizeof ex->lbuf - 1 - ex->llen);
		if (r < 0) break;
		if (r == 0) { /* EOF: child gone */
			ex->alive = false;
			ex->pending = 0;
			any = true;
			break;
		}
		any = true;
		ex->llen += r;
		char *start = ex->lbuf, *nl;
		while ((nl = memchr(start, '\n', ex->lbuf + ex->llen - start))) {
			*nl = 0;
			if (!strcmp(start, "\x01")) {
				if (ex->pending > 0) ex->pending--;
			} else {
				/* substitute page identity tokens from the child */
				char *tok = strstr(start, "@pfn=");
				if (tok) {
					uint64_t pfn = strtoull(tok + 5, NULL, 16);
					*tok = 0;
					outf("%s: %s#%d", ex->label, start, pfn_label(pfn));
				} else {
					outf("%s: %s", ex->label, start);
				}
			}
			start = nl + 1;
		}
		memmove(ex->lbuf, start, ex->lbuf + ex->llen - start);
		ex->llen -= start - ex->lbuf;
	}
	return any;
}

static bool uffds_have_input(void)
{
	for (int i = 0; i < n_uffds; i++) {
		if (!uffds[i].open || !uffds[i].api_done || uffds[i].blocking) continue;
		struct pollfd p = {.fd = uffds[i].fd, .events = POLLIN};
		if (poll(&p, 1, 0) > 0 && (p.revents & POLLIN)) return true;
	}
	return false;
}

static bool quiescent(void)
{
	pthread_mutex_lock(&st_mu);
	bool busy = handler_busy, off = policy & POL_OFF;
	pthread_mutex_unlock(&st_mu);
	if (busy) return false;
	if (!off && uffds_have_input()) return false;
	struct executor *exs[] = {&ex_worker, &ex_child};
	for (int i = 0; i < 2; i++) {
		struct executor *ex = exs[i];
		if (!ex->alive || ex->pending == 0) continue;
		if (!tid_in_userfault(ex->pid, ex->tid)) return false;
	}
	return true;
}

static void settle(void)
{
	int stable = 0;
	double deadline = now_s() + 20.0;
	for (;;) {
		bool any = exec_drain(&ex_worker);
		any |= exec_drain(&ex_child);
		if (!any && quiescent()) stable++;
		else stable = 0;
		if (stable >= 4) break;
		if (now_s() > deadline) { outf("TIMEOUT settling"); break; }
		struct pollfd p[2];
		int n = 0;
		if (ex_worker.alive) p[n++] = (struct pollfd){.fd = ex_worker.res_rd, .events = POLLIN};
		if (ex_child.alive) p[n++] = (struct pollfd){.fd = ex_child.res_rd, .events = POLLIN};
		poll(p, n, 1);
	}
	pthread_mutex_lock(&out_mu);
	pq_flush_locked();
	pthread_mutex_unlock(&out_mu);
	struct executor *exs[] = {&ex_worker, &ex_child};
	for (int i = 0; i < 2; i++) {
		struct executor *ex = exs[i];
		if (ex->alive && ex->pending > 0 && !ex->blocked_reported) {
			outf("%s: %s blocked", ex->label, ex->curop);
			ex->blocked_reported = true;
		}
	}
}

/* ------------------------------------------------------------------ */
/* Handler thread                                                      */
/* ------------------------------------------------------------------ */
static void handler_kick(void)
{
	uint64_t one = 1;
	ssize_t w = write(ctl_efd, &one, 8);
	(void)w;
}

/* Wait until the handler has rebuilt its poll set (call without out_mu). */
static void handler_sync(void)
{
	pthread_mutex_lock(&st_mu);
	int want = ++handler_gen;
	handler_kick();
	while (handler_seen_gen < want) pthread_cond_wait(&st_cv, &st_mu);
	pthread_mutex_unlock(&st_mu);
}

static const char *who_tid(uint32_t t)
{
	static __thread char buf[32];
	if (t == 0) return NULL;
	if ((pid_t)t == worker_tid) return "worker";
	if ((pid_t)t == child_pid) return "child";
	if ((pid_t)t == main_tid) return "main";
	snprintf(buf, sizeof buf, "other");
	return buf;
}

static uint8_t hpage[PG] __attribute__((aligned(4096)));

static void handle_msg(int uid, struct uffd_msg *m, bool resolve)
{
	char a[96], b[96];
	int fd = uffds[uid].fd;
	switch (m->event) {
	case UFFD_EVENT_PAGEFAULT: {
		uint64_t fl = m->arg.pagefault.flags;
		char fls[64] = "";
		size_t l = 0;
		if (fl & UFFD_PAGEFAULT_FLAG_WRITE) l += snprintf(fls + l, sizeof fls - l, "WRITE");
		if (fl & UFFD_PAGEFAULT_FLAG_WP) l += snprintf(fls + l, sizeof fls - l, "%sWP", l ? "|" : "");
		if (fl & UFFD_PAGEFAULT_FLAG_MINOR) l += snprintf(fls + l, sizeof fls - l, "%sMINOR", l ? "|" : "");
		if (fl & ~7ULL) l += snprintf(fls + l, sizeof fls - l, "%s%#llx", l ? "|" : "", (unsigned long long)(fl & ~7ULL));
		if (!l) snprintf(fls, sizeof fls, "0");
		uintptr_t addr = m->arg.pagefault.address;
		addr_name(addr, a, sizeof a);
		const char *w = who_tid(m->arg.pagefault.feat.ptid);
		hout("event u%d pagefault %s flags=%s%s%s", uid, a, fls, w ? " tid=" : "", w ? w : "");
		/* a new fault: let settle() report "blocked" again */
		ex_worker.blocked_reported = false;
		ex_child.blocked_reported = false;
		uintptr_t pg = addr & ~(PG - 1);
		addr_name(pg, a, sizeof a);
		pthread_mutex_lock(&st_mu);
		int pol = resolve ? policy : 0;
		uint8_t pb = policy_byte;
		pthread_mutex_unlock(&st_mu);
		if ((fl & UFFD_PAGEFAULT_FLAG_WP) && (pol & POL_UNWP)) {
			struct uffdio_writeprotect wp = {.range = {pg, PG}, .mode = 0};
			unsigned s = hslot();
			int r = ioctl(fd, UFFDIO_WRITEPROTECT, &wp);
			hput(s, "handler u%d unwp %s: %s", uid, a, r ? errname(errno) : "ok");
		} else if ((fl & UFFD_PAGEFAULT_FLAG_MINOR) && (pol & (POL_CONT | POL_CONTWP))) {
			struct uffdio_continue c = {.range = {pg, PG},
						    .mode = (pol & POL_CONTWP) ? UFFDIO_CONTINUE_MODE_WP : 0,
						    .mapped = UNTOUCHED_SENTINEL};
			unsigned s = hslot();
			int r = ioctl(fd, UFFDIO_CONTINUE, &c);
			int e = r ? errno : 0;
			hput(s, "handler u%d continue%s %s: %s mapped=%lld", uid, (pol & POL_CONTWP) ? " wp" : "",
			     a, errname(e), (long long)c.mapped);
		} else if (!(fl & (UFFD_PAGEFAULT_FLAG_WP | UFFD_PAGEFAULT_FLAG_MINOR)) &&
			   (pol & (POL_COPY | POL_COPYWP | POL_ZERO))) {
			int r, e;
			if (pol & POL_ZERO) {
				struct uffdio_zeropage z = {.range = {pg, PG}, .mode = 0, .zeropage = UNTOUCHED_SENTINEL};
				unsigned s = hslot();
				r = ioctl(fd, UFFDIO_ZEROPAGE, &z);
				e = r ? errno : 0;
				hput(s, "handler u%d zeropage %s: %s", uid, a, errname(e));
			} else {
				memset(hpage, pb, PG);
				struct uffdio_copy c = {.dst = pg, .src = (uintptr_t)hpage, .len = PG,
							.mode = (pol & POL_COPYWP) ? UFFDIO_COPY_MODE_WP : 0,
							.copy = UNTOUCHED_SENTINEL};
				unsigned s = hslot();
				r = ioctl(fd, UFFDIO_COPY, &c);
				e = r ? errno : 0;
				hput(s, "handler u%d copy%s %s %#x: %s", uid, (pol & POL_COPYWP) ? " wp" : "", a, pb,
				     errname(e));
			}
			if (e == EEXIST) {
				struct uffdio_range rg = {pg, PG};
				unsigned s = hslot();
				r = ioctl(fd, UFFDIO_WAKE, &rg);
				hput(s, "handler u%d wake %s: %s", uid, a, r ? errname(errno) : "ok");
			}
		} else if (pol & POL_WAKE) {
			struct uffdio_range rg = {pg, PG};
			unsigned s = hslot();
			int r = ioctl(fd, UFFDIO_WAKE, &rg);
			hput(s, "handler u%d wake %s: %s", uid, a, r ? errname(errno) : "ok");
		}
		break;
	}
	case UFFD_EVENT_FORK: {
		int nfd = (int)m->arg.fork.ufd;
		pthread_mutex_lock(&st_mu);
		int id = n_uffds++;
		uffds[id] = (struct uffd_ent){.fd = nfd, .open = true, .api_done = true,
					      .features = uffds[uid].features};
		handler_gen++;
		pthread_mutex_unlock(&st_mu);
		hout("event u%d fork -> u%d", uid, id);
		break;
	}
	case UFFD_EVENT_REMAP:
		addr_name(m->arg.remap.from, a, sizeof a);
		addr_name(m->arg.remap.to, b, sizeof b);
		hout("event u%d remap %s -> %s pages=%llu", uid, a, b,
		     (unsigned long long)(m->arg.remap.len / PG));
		break;
	case UFFD_EVENT_REMOVE:
	case UFFD_EVENT_UNMAP:
		addr_name(m->arg.remove.start, a, sizeof a);
		hout("event u%d %s %s pages=%llu", uid, m->event == UFFD_EVENT_REMOVE ? "remove" : "unmap", a,
		     (unsigned long long)((m->arg.remove.end - m->arg.remove.start) / PG));
		break;
	default:
		hout("event u%d unknown %#x", uid, m->event);
	}
}

static void *handler_main(void *arg)
{
	(void)arg;
	for (;;) {
		struct pollfd p[MAXUFFD + 1];
		int ids[MAXUFFD + 1];
		int n = 0;
		pthread_mutex_lock(&st_mu);
		if (handler_quit) { pthread_mutex_unlock(&st_mu); return NULL; }
		p[n] = (struct pollfd){.fd = ctl_efd, .events = POLLIN};
		ids[n++] = -1;
		if (!(policy & POL_OFF))
			for (int i = 0; i < n_uffds; i++)
				if (uffds[i].open && uffds[i].api_done && !uffds[i].blocking) {
					p[n] = (struct pollfd){.fd = uffds[i].fd, .events = POLLIN};
					ids[n++] = i;
				}
		int gen = handler_gen;
		handler_seen_gen = gen;
		pthread_cond_broadcast(&st_cv);
		pthread_mutex_unlock(&st_mu);

		if (poll(p, n, -1) <= 0) continue;
		if (p[0].revents) {
			uint64_t v;
			ssize_t r = read(ctl_efd, &v, 8);
			(void)r;
			continue;
		}
		for (int k = 1; k < n; k++) {
			if (!(p[k].revents & (POLLIN | POLLERR | POLLHUP))) continue;
			pthread_mutex_lock(&st_mu);
			if (handler_gen != gen) { pthread_mutex_unlock(&st_mu); break; }
			handler_busy = true;
			pthread_mutex_unlock(&st_mu);
			struct uffd_msg m;
			ssize_t r = read(p[k].fd, &m, sizeof m);
			if (r == (ssize_t)sizeof m) handle_msg(ids[k], &m, true);
			else if (r < 0 && errno != EAGAIN) outf("handler u%d read: %s", ids[k], errname(errno));
			pthread_mutex_lock(&st_mu);
			handler_busy = false;
			bool changed = handler_gen != gen;
			pthread_mutex_unlock(&st_mu);
			if (changed) break;
		}
	}
}

/* ------------------------------------------------------------------ */
/* Commands                                                            */
/* ------------------------------------------------------------------ */
#define MAXARG 40
struct cmd {
	int argc;
	char *argv[MAXARG];
};

static bool has_word(struct cmd *c, int from, const char *w)
{
	for (int i = from; i < c->argc; i++)
		if (!strcmp(c->argv[i], w)) return true;
	return false;
}

static int cur_fd(void)
{
	if (cur_uffd < 0 || !uffds[cur_uffd].open) return -1;
	return uffds[cur_uffd].fd;
}

/* name first count -> range */
static bool get_range(struct cmd *c, int i, uintptr_t *start, uint64_t *len)
{
	if (c->argc < i + 3) return false;
	if (!parse_loc(c->argv[i], c->argv[i + 1], start, NULL)) return false;
	return parse_pages(c->argv[i + 2], len);
}

static void fmt_fill(int64_t v, char *buf, size_t n)
{
	if (v == UNTOUCHED_SENTINEL) snprintf(buf, n, "untouched");
	else if (v < 0) snprintf(buf, n, "-%s", errname((int)-v));
	else snprintf(buf, n, "%lld", (long long)v);
}

#define USAGE(msg) do { emit("USAGE %s", msg); return; } while (0)

static void cmd_map(struct cmd *c)
{
	if (c->argc < 3) USAGE("map NAME PAGES [anon|shmem|file] [private|shared] [PROT] [populate]");
	if (find_map(c->argv[1])) USAGE("duplicate name");
	uint64_t len;
	if (!parse_pages(c->argv[2], &len) || !len) USAGE("bad size");
	enum kind k = K_ANON;
	bool shared = false, shared_set = false, populate = false, rofd = false;
	int prot = PROT_READ | PROT_WRITE;
	for (int i = 3; i < c->argc; i++) {
		const char *w = c->argv[i];
		if (!strcmp(w, "anon")) k = K_ANON;
		else if (!strcmp(w, "shmem")) k = K_SHMEM;
		else if (!strcmp(w, "file")) k = K_FILE;
		else if (!strcmp(w, "private")) { shared = false; shared_set = true; }
		else if (!strcmp(w, "shared")) { shared = true; shared_set = true; }
		else if (!strcmp(w, "populate")) populate = true;
		else if (!strcmp(w, "rofd")) rofd = true; /* map through a read-only fd: no VM_MAYWRITE */
		else if (!parse_prot(w, &prot)) USAGE("bad map option");
	}
	if (!shared_set) shared = (k != K_ANON);
	int fd = -1;
	if (k == K_SHMEM) {
		fd = memfd_create(c->argv[1], MFD_CLOEXEC);
	} else if (k == K_FILE) {
		fd = open("/tmp", O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
	}
	if (k != K_ANON) {
		if (fd < 0 || ftruncate(fd, (off_t)((len + PG - 1) & ~(PG - 1)))) {
			emit("%s", errname(errno));
			return;
		}
	}
	int mfd = fd;
	if (rofd && fd >= 0) {
		char path[64];
		snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
		mfd = open(path, O_RDONLY | O_CLOEXEC);
		if (mfd < 0) { emit("%s", errname(errno)); return; }
	}
	uintptr_t addr = arena_next;
	int flags = (shared ? MAP_SHARED : MAP_PRIVATE) | MAP_FIXED_NOREPLACE | (populate ? MAP_POPULATE : 0);
	if (k == K_ANON) flags |= MAP_ANONYMOUS;
	void *p = mmap((void *)addr, len, prot, flags, mfd, 0);
	if (mfd != fd) close(mfd);
	if (p == MAP_FAILED) { emit("%s", errname(errno)); if (fd >= 0) close(fd); return; }
	if ((uintptr_t)p != addr) { emit("FATAL mapping landed elsewhere"); exit(1); }
	struct mapping *m = &maps[nmaps];
	snprintf(m->name, sizeof m->name, "%s", c->argv[1]);
	m->base = addr; m->len = len; m->kind = k; m->shared = shared; m->fd = fd; m->off = 0;
	__atomic_store_n(&nmaps, nmaps + 1, __ATOMIC_RELEASE);
	arena_next += ((len + PMD_SZ - 1) & ~(PMD_SZ - 1)) + PMD_SZ;
	emit("ok");
}

static void cmd_alias(struct cmd *c)
{
	if (c->argc < 3) USAGE("alias NEW OLD [private|shared] [PROT]");
	struct mapping *o = find_map(c->argv[2]);
	if (!o || o->fd < 0 || find_map(c->argv[1])) USAGE("alias needs a new name and a shmem/file mapping");
	bool shared = o->shared;
	int prot = PROT_READ | PROT_WRITE;
	for (int i = 3; i < c->argc; i++) {
		if (!strcmp(c->argv[i], "private")) shared = false;
		else if (!strcmp(c->argv[i], "shared")) shared = true;
		else if (!parse_prot(c->argv[i], &prot)) USAGE("bad alias option");
	}
	uintptr_t addr = arena_next;
	void *p = mmap((void *)addr, o->len, prot, (shared ? MAP_SHARED : MAP_PRIVATE) | MAP_FIXED_NOREPLACE,
		       o->fd, o->off);
	if (p == MAP_FAILED) { emit("%s", errname(errno)); return; }
	struct mapping *m = &maps[nmaps];
	*m = *o;
	snprintf(m->name, sizeof m->name, "%s", c->argv[1]);
	m->base = addr; m->shared = shared;
	__atomic_store_n(&nmaps, nmaps + 1, __ATOMIC_RELEASE);
	arena_next += ((o->len + PMD_SZ - 1) & ~(PMD_SZ - 1)) + PMD_SZ;
	emit("ok");
}

/* mremap of OLD (or a part of it) to the slot at addr, named NEW; false on failure (already printed). */
static bool do_mremap(struct cmd *c, uintptr_t addr)
{
	if (c->argc < 3) { emit("USAGE mremap OLD NEW [FIRST COUNT]"); return false; }
	struct mapping *o = find_map(c->argv[1]);
	if (!o || find_map(c->argv[2])) { emit("USAGE bad names"); return false; }
	uintptr_t start = o->base;
	uint64_t len = o->len;
	if (c->argc >= 5) {
		uint64_t off;
		if (!parse_pages(c->argv[3], &off) || !parse_pages(c->argv[4], &len)) { emit("USAGE bad range"); return false; }
		start = o->base + off;
	}
	/* name the destination first: a REMAP event may be printed during mremap */
	struct mapping *m = &maps[nmaps];
	*m = *o;
	snprintf(m->name, sizeof m->name, "%s", c->argv[2]);
	m->base = addr; m->len = len; m->off = o->off + (start - o->base);
	__atomic_store_n(&nmaps, nmaps + 1, __ATOMIC_RELEASE);
	void *p = mremap((void *)start, len, len, MREMAP_MAYMOVE | MREMAP_FIXED, (void *)addr);
	if (p == MAP_FAILED) {
		int e = errno;
		__atomic_store_n(&nmaps, nmaps - 1, __ATOMIC_RELEASE);
		emit("%s", errname(e));
		return false;
	}
	emit("ok");
	return true;
}

static void cmd_mremap(struct cmd *c)
{
	uintptr_t addr = arena_next;
	if (!do_mremap(c, addr)) return;
	uint64_t len = maps[nmaps - 1].len;
	arena_next += ((len + PMD_SZ - 1) & ~(PMD_SZ - 1)) + PMD_SZ;
}

static void cmd_mprotect(struct cmd *c)
{
	uintptr_t s; uint64_t l; int prot;
	if (!get_range(c, 1, &s, &l) || c->argc < 5 || !parse_prot(c->argv[4], &prot))
		USAGE("mprotect NAME FIRST COUNT PROT");
	int r = mprotect((void *)s, l, prot);
	emit("%s", r ? errname(errno) : "ok");
}

static const struct { const char *n; int a; } madv_names[] = {
	{"dontneed", MADV_DONTNEED}, {"pageout", MADV_PAGEOUT}, {"free", MADV_FREE},
	{"remove", MADV_REMOVE}, {"hugepage", MADV_HUGEPAGE}, {"nohugepage", MADV_NOHUGEPAGE},
	{"populate_read", MADV_POPULATE_READ}, {"populate_write", MADV_POPULATE_WRITE},
	{"collapse", MADV_COLLAPSE}, {"dontfork", MADV_DONTFORK}, {"dofork", MADV_DOFORK},
	{"cold", MADV_COLD}, {"wipeonfork", MADV_WIPEONFORK}, {"normal", MADV_NORMAL},
};

static void cmd_madvise(struct cmd *c)
{
	uintptr_t s; uint64_t l;
	if (!get_range(c, 1, &s, &l) || c->argc < 5) USAGE("madvise NAME FIRST COUNT ADVICE");
	int adv = -1;
	for (size_t i = 0; i < sizeof madv_names / sizeof madv_names[0]; i++)
		if (!strcmp(madv_names[i].n, c->argv[4])) adv = madv_names[i].a;
	if (adv < 0) USAGE("unknown advice");
	int r = madvise((void *)s, l, adv);
	emit("%s", r ? errname(errno) : "ok");
}

static void cmd_thp(struct cmd *c)
{
	struct mapping *m;
	if (c->argc < 3 || !(m = find_map(c->argv[1]))) USAGE("thp NAME on|off");
	int r = madvise((void *)m->base, m->len, !strcmp(c->argv[2], "on") ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
	emit("%s", r ? errname(errno) : "ok");
}

static void cmd_munmap(struct cmd *c)
{
	uintptr_t s; uint64_t l;
	if (!get_range(c, 1, &s, &l)) USAGE("munmap NAME FIRST COUNT");
	int r = munmap((void *)s, l);
	emit("%s", r ? errname(errno) : "ok");
}

static void cmd_clear_refs(struct cmd *c)
{
	const char *v = c->argc > 1 ? c->argv[1] : "4";
	int fd = open("/proc/self/clear_refs", O_WRONLY | O_CLOEXEC);
	if (fd < 0) { emit("%s", errname(errno)); return; }
	ssize_t r = write(fd, v, strlen(v));
	int e = r < 0 ? errno : 0;
	close(fd);
	emit("%s", errname(e));
}

static void cmd_pagemap(struct cmd *c)
{
	struct mapping *m;
	uintptr_t s; uint64_t l;
	if (!get_range(c, 1, &s, &l) || !(m = find_map(c->argv[1]))) USAGE("pagemap NAME FIRST COUNT");
	size_t np = l / PG;
	uint64_t *v = calloc(np ? np : 1, 8);
	int e = read_pagemap(s, np, v);
	if (e) { emit("%s", errname(e)); free(v); return; }
	size_t i = 0;
	while (i < np) {
		char f[160], g[160];
		fmt_pm(v[i], f, sizeof f);
		size_t j = i + 1;
		while (j < np) {
			fmt_pm(v[j], g, sizeof g);
			if (strcmp(f, g)) break;
			j++;
		}
		size_t p0 = (s - m->base) / PG + i, p1 = (s - m->base) / PG + j - 1;
		if (p0 == p1) emit("pagemap %s %zu: %s", m->name, p0, f);
		else emit("pagemap %s %zu-%zu: %s", m->name, p0, p1, f);
		i = j;
	}
	free(v);
}

static void cmd_pageid(struct cmd *c)
{
	uintptr_t a;
	if (c->argc < 3 || !parse_loc(c->argv[1], c->argv[2], &a, NULL)) USAGE("pageid NAME PAGE");
	uint64_t v = 0;
	int e = read_pagemap(a & ~(PG - 1), 1, &v);
	if (e) { emit("%s", errname(e)); return; }
	if (!(v & PM_PRESENT)) { emit("pageid %s %s: not-present", c->argv[1], c->argv[2]); return; }
	uint64_t pfn = v & PM_PFN_MASK;
	if (in_child) emit("pageid %s %s: @pfn=%llx", c->argv[1], c->argv[2], (unsigned long long)pfn);
	else emit("pageid %s %s: #%d", c->argv[1], c->argv[2], pfn_label(pfn));
}

static void cmd_vmas(struct cmd *c)
{
	struct mapping *m;
	if (c->argc < 2 || !(m = find_map(c->argv[1]))) USAGE("vmas NAME");
	FILE *f = fopen("/proc/self/smaps", "re");
	if (!f) { emit("%s", errname(errno)); return; }
	char line[1024];
	bool in = false;
	unsigned long vs = 0, ve = 0;
	char perms[8] = "";
	long rss = 0, anonhuge = 0, shmpmd = 0, swap = 0;
	int nv = 0;
	while (fgets(line, sizeof line, f)) {
		unsigned long a, b;
		char p[8];
		long v;
		if (isxdigit((unsigned char)line[0]) && sscanf(line, "%lx-%lx %7s", &a, &b, p) == 3) {
			in = (a < m->base + m->len && b > m->base);
			vs = a; ve = b;
			snprintf(perms, sizeof perms, "%s", p);
			rss = anonhuge = shmpmd = swap = 0;
			continue;
		}
		if (!in) continue;
		if (sscanf(line, "Rss: %ld kB", &v) == 1) rss = v;
		else if (sscanf(line, "AnonHugePages: %ld kB", &v) == 1) anonhuge = v;
		else if (sscanf(line, "ShmemPmdMapped: %ld kB", &v) == 1) shmpmd = v;
		else if (sscanf(line, "Swap: %ld kB", &v) == 1) swap = v;
		else if (!strncmp(line, "VmFlags:", 8)) {
			char fl[128] = "";
			size_t l = 0;
			const char *want[] = {"um", "uw", "ui", "hg", "nh"};
			for (int i = 0; i < 5; i++) {
				char pat[8];
				snprintf(pat, sizeof pat, " %s", want[i]);
				char *q = strstr(line + 8, pat);
				if (q && (q[3] == ' ' || q[3] == '\n' || q[3] == 0))
					l += snprintf(fl + l, sizeof fl - l, "%s%s", l ? "," : "", want[i]);
			}
			long p0 = ((long)vs - (long)m->base) / (long)PG;
			long p1 = ((long)ve - (long)m->base) / (long)PG - 1;
			emit("vma %s %ld-%ld %s flags=%s rss=%ld swap=%ld pmd_mapped=%ld", m->name, p0, p1, perms,
			     l ? fl : "-", rss / 4, swap / 4, (anonhuge + shmpmd) / 2048);
			nv++;
			in = false;
		}
	}
	fclose(f);
	if (!nv) emit("vma %s: none", m->name);
}

static int open_uffd(bool dev, int flags)
{
	if (dev) {
		int dfd = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
		if (dfd < 0) return -1;
		int fd = ioctl(dfd, USERFAULTFD_IOC_NEW, flags);
		int e = errno;
		close(dfd);
		errno = e;
		return fd;
	}
	return (int)syscall(SYS_userfaultfd, flags);
}

static bool parse_features(struct cmd *c, int from, uint64_t *f)
{
	*f = 0;
	for (int i = from; i < c->argc; i++) {
		const char *w = c->argv[i];
		if (!strcmp(w, "dev") || !strcmp(w, "usermode") || !strcmp(w, "blocking")) continue;
		bool ok = false;
		for (size_t k = 0; k < sizeof feat_names / sizeof feat_names[0]; k++)
			if (!strcmp(w, feat_names[k].name)) { *f |= feat_names[k].bit; ok = true; }
		if (!ok && !strncmp(w, "bit", 3)) { *f |= 1ULL << atoi(w + 3); ok = true; }
		if (!ok && !strncmp(w, "0x", 2)) { *f |= strtoull(w, NULL, 16); ok = true; }
		if (!ok) return false;
	}
	return true;
}

static void do_api(int id, uint64_t feats, uint64_t api, int label)
{
	struct uffdio_api a = {.api = api, .features = feats};
	int r = ioctl(uffds[id].fd, UFFDIO_API, &a);
	int e = r ? errno : 0;
	char io[256];
	fmt_ioctls(a.ioctls, io, sizeof io);
	if (!r) {
		pthread_mutex_lock(&st_mu);
		uffds[id].api_done = true;
		uffds[id].features = feats;
		pthread_mutex_unlock(&st_mu);
	}
	if (label >= 0)
		emit("%s u%d features=%#llx ioctls=%s", errname(e), label, (unsigned long long)a.features, io);
	else
		emit("%s features=%#llx ioctls=%s", errname(e), (unsigned long long)a.features, io);
}

static void cmd_uffd(struct cmd *c)
{
	if (c->argc < 2) USAGE("uffd open|create|api|close|use|events|poll ...");
	const char *sub = c->argv[1];
	if (!strcmp(sub, "open") || !strcmp(sub, "create")) {
		uint64_t f;
		if (!parse_features(c, 2, &f)) USAGE("unknown feature");
		int flags = O_CLOEXEC | (has_word(c, 2, "blocking") ? 0 : O_NONBLOCK) |
			    (has_word(c, 2, "usermode") ? UFFD_USER_MODE_ONLY : 0);
		int fd = open_uffd(has_word(c, 2, "dev"), flags);
		if (fd < 0) { emit("%s", errname(errno)); return; }
		pthread_mutex_lock(&st_mu);
		int id = n_uffds++;
		uffds[id] = (struct uffd_ent){.fd = fd, .open = true, .blocking = has_word(c, 2, "blocking")};
		cur_uffd = id;
		pthread_mutex_unlock(&st_mu);
		if (!strcmp(sub, "create")) { emit("ok u%d", id); return; }
		do_api(id, f, UFFD_API, id);
		return;
	}
	if (!strcmp(sub, "api")) {
		uint64_t f, api = UFFD_API;
		int from = 2;
		if (c->argc > 2 && !strncmp(c->argv[2], "api=", 4)) { api = strtoull(c->argv[2] + 4, NULL, 0); from = 3; }
		if (!parse_features(c, from, &f)) USAGE("unknown feature");
		if (cur_fd() < 0) USAGE("no uffd");
		do_api(cur_uffd, f, api, -1);
		return;
	}
	if (!strcmp(sub, "use")) {
		int id = c->argc > 2 ? atoi(c->argv[2] + (c->argv[2][0] == 'u')) : -1;
		if (id < 0 || id >= n_uffds) USAGE("uffd use uN");
		cur_uffd = id;
		emit("ok");
		return;
	}
	if (!strcmp(sub, "close")) {
		/* the handshake with the handler happened before (see run_line) */
		int id = c->argc > 2 ? atoi(c->argv[2] + (c->argv[2][0] == 'u')) : cur_uffd;
		if (id < 0 || id >= n_uffds || uffds[id].fd < 0) USAGE("no such uffd");
		pthread_mutex_lock(&st_mu);
		uffds[id].open = false;
		pthread_mutex_unlock(&st_mu);
		int r = close(uffds[id].fd);
		uffds[id].fd = -1;
		emit("%s", r ? errname(errno) : "ok");
		return;
	}
	if (!strcmp(sub, "poll")) {
		if (cur_fd() < 0) USAGE("no uffd");
		struct pollfd p = {.fd = cur_fd(), .events = POLLIN};
		int r = poll(&p, 1, 0);
		char ev[64] = "";
		size_t l = 0;
		if (p.revents & POLLIN) l += snprintf(ev + l, sizeof ev - l, "%sPOLLIN", l ? "|" : "");
		if (p.revents & POLLERR) l += snprintf(ev + l, sizeof ev - l, "%sPOLLERR", l ? "|" : "");
		if (p.revents & POLLHUP) l += snprintf(ev + l, sizeof ev - l, "%sPOLLHUP", l ? "|" : "");
		emit("poll: %s", r <= 0 || !l ? "none" : ev);
		return;
	}
	if (!strcmp(sub, "events")) {
		/* read pending messages from the main thread (use with "handler off") */
		if (cur_fd() < 0) USAGE("no uffd");
		int n = 0;
		for (;;) {
			struct uffd_msg m;
			ssize_t r = read(cur_fd(), &m, sizeof m);
			if (r != (ssize_t)sizeof m) {
				if (r < 0 && errno != EAGAIN) emit("read: %s", errname(errno));
				break;
			}
			n++;
			tl_holds_out = true;
			handle_msg(cur_uffd, &m, false);
			tl_holds_out = false;
		}
		emit("messages=%d", n);
		return;
	}
	USAGE("unknown uffd subcommand");
}

static int parse_reg_modes(struct cmd *c, int from, uint64_t *mode)
{
	*mode = 0;
	for (int i = from; i < c->argc; i++) {
		const char *w = c->argv[i];
		if (!strcmp(w, "missing")) *mode |= UFFDIO_REGISTER_MODE_MISSING;
		else if (!strcmp(w, "wp")) *mode |= UFFDIO_REGISTER_MODE_WP;
		else if (!strcmp(w, "minor")) *mode |= UFFDIO_REGISTER_MODE_MINOR;
		else if (!strcmp(w, "none")) ;
		else if (!strncmp(w, "mode=", 5)) *mode |= strtoull(w + 5, NULL, 0);
		else return 0;
	}
	return 1;
}

static void cmd_register(struct cmd *c)
{
	uintptr_t s; uint64_t l, mode;
	if (!get_range(c, 1, &s, &l) || !parse_reg_modes(c, 4, &mode))
		USAGE("register NAME FIRST COUNT missing|wp|minor...");
	if (cur_fd() < 0) USAGE("no uffd");
	struct uffdio_register r = {.range = {s, l}, .mode = mode, .ioctls = 0};
	int rc = ioctl(cur_fd(), UFFDIO_REGISTER, &r);
	if (rc) { emit("%s", errname(errno)); return; }
	char io[256];
	fmt_ioctls(r.ioctls, io, sizeof io);
	emit("ok ioctls=%s", io);
}

static void cmd_unregister(struct cmd *c)
{
	uintptr_t s; uint64_t l;
	if (!get_range(c, 1, &s, &l)) USAGE("unregister NAME FIRST COUNT");
	if (cur_fd() < 0) USAGE("no uffd");
	struct uffdio_range r = {s, l};
	int rc = ioctl(cur_fd(), UFFDIO_UNREGISTER, &r);
	emit("%s", rc ? errname(errno) : "ok");
}

static void cmd_wp(struct cmd *c, bool protect)
{
	uintptr_t s; uint64_t l;
	if (!get_range(c, 1, &s, &l)) USAGE("wp|unwp NAME FIRST COUNT [dontwake]");
	if (cur_fd() < 0) USAGE("no uffd");
	uint64_t mode = protect ? UFFDIO_WRITEPROTECT_MODE_WP : 0;
	if (has_word(c, 4, "dontwake")) mode |= UFFDIO_WRITEPROTECT_MODE_DONTWAKE;
	for (int i = 4; i < c->argc; i++)
		if (!strncmp(c->argv[i], "mode=", 5)) mode = strtoull(c->argv[i] + 5, NULL, 0);
	struct uffdio_writeprotect w = {.range = {s, l}, .mode = mode};
	int rc = ioctl(cur_fd(), UFFDIO_WRITEPROTECT, &w);
	emit("%s", rc ? errname(errno) : "ok");
}

static uint8_t *srcbuf;

static void cmd_copy(struct cmd *c)
{
	uintptr_t s; uint64_t l; uint8_t b;
	if (!get_range(c, 1, &s, &l) || c->argc < 5 || !parse_byte(c->argv[4], &b))
		USAGE("copy NAME FIRST COUNT BYTE [wp] [dontwake] [srcoff=N]");
	if (cur_fd() < 0) USAGE("no uffd");
	uint64_t mode = 0, srcoff = 0;
	if (has_word(c, 5, "wp")) mode |= UFFDIO_COPY_MODE_WP;
	if (has_word(c, 5, "dontwake")) mode |= UFFDIO_COPY_MODE_DONTWAKE;
	for (int i = 5; i < c->argc; i++) {
		if (!strncmp(c->argv[i], "mode=", 5)) mode = strtoull(c->argv[i] + 5, NULL, 0);
		if (!strncmp(c->argv[i], "srcoff=", 7)) srcoff = strtoull(c->argv[i] + 7, NULL, 0);
	}
	size_t need = l + srcoff + PG;
	if (need > (64UL << 20)) USAGE("copy too large");
	memset(srcbuf, b, need);
	struct uffdio_copy cp = {.dst = s, .src = (uintptr_t)srcbuf + srcoff, .len = l, .mode = mode,
				 .copy = UNTOUCHED_SENTINEL};
	int rc = ioctl(cur_fd(), UFFDIO_COPY, &cp);
	char v[64];
	fmt_fill(cp.copy, v, sizeof v);
	emit("%s copy=%s", rc ? errname(errno) : "ok", v);
}

static void cmd_zeropage(struct cmd *c)
{
	uintptr_t s; uint64_t l;
	if (!get_range(c, 1, &s, &l)) USAGE("zeropage NAME FIRST COUNT [dontwake]");
	if (cur_fd() < 0) USAGE("no uffd");
	uint64_t mode = has_word(c, 4, "dontwake") ? UFFDIO_ZEROPAGE_MODE_DONTWAKE : 0;
	for (int i = 4; i < c->argc; i++)
		if (!strncmp(c->argv[i], "mode=", 5)) mode = strtoull(c->argv[i] + 5, NULL, 0);
	struct uffdio_zeropage z = {.range = {s, l}, .mode = mode, .zeropage = UNTOUCHED_SENTINEL};
	int rc = ioctl(cur_fd(), UFFDIO_ZEROPAGE, &z);
	char v[64];
	fmt_fill(z.zeropage, v, sizeof v);
	emit("%s zeropage=%s", rc ? errname(errno) : "ok", v);
}

static void cmd_continue(struct cmd *c)
{
	uintptr_t s; uint64_t l;
	if (!get_range(c, 1, &s, &l)) USAGE("continue NAME FIRST COUNT [wp] [dontwake]");
	if (cur_fd() < 0) USAGE("no uffd");
	uint64_t mode = 0;
	if (has_word(c, 4, "wp")) mode |= UFFDIO_CONTINUE_MODE_WP;
	if (has_word(c, 4, "dontwake")) mode |= UFFDIO_CONTINUE_MODE_DONTWAKE;
	struct uffdio_continue ct = {.range = {s, l}, .mode = mode, .mapped = UNTOUCHED_SENTINEL};
	int rc = ioctl(cur_fd(), UFFDIO_CONTINUE, &ct);
	char v[64];
	fmt_fill(ct.mapped, v, sizeof v);
	emit("%s mapped=%s", rc ? errname(errno) : "ok", v);
}

static void cmd_poison(struct cmd *c)
{
	uintptr_t s; uint64_t l;
	if (!get_range(c, 1, &s, &l)) USAGE("poison NAME FIRST COUNT [dontwake]");
	if (cur_fd() < 0) USAGE("no uffd");
	struct k_uffdio_poison p = {.range = {s, l}, .mode = has_word(c, 4, "dontwake") ? 1 : 0,
				    .updated = UNTOUCHED_SENTINEL};
	int rc = ioctl(cur_fd(), K_UFFDIO_POISON, &p);
	char v[64];
	fmt_fill(p.updated, v, sizeof v);
	emit("%s updated=%s", rc ? errname(errno) : "ok", v);
}

static void cmd_move(struct cmd *c)
{
	uintptr_t d, s; uint64_t l;
	if (c->argc < 6 || !parse_loc(c->argv[1], c->argv[2], &d, NULL) ||
	    !parse_loc(c->argv[3], c->argv[4], &s, NULL) || !parse_pages(c->argv[5], &l))
		USAGE("move DST DFIRST SRC SFIRST COUNT [holes] [dontwake]");
	if (cur_fd() < 0) USAGE("no uffd");
	uint64_t mode = 0;
	if (has_word(c, 6, "holes")) mode |= K_UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES;
	if (has_word(c, 6, "dontwake")) mode |= K_UFFDIO_MOVE_MODE_DONTWAKE;
	struct k_uffdio_move mv = {.dst = d, .src = s, .len = l, .mode = mode, .move = UNTOUCHED_SENTINEL};
	int rc = ioctl(cur_fd(), K_UFFDIO_MOVE, &mv);
	char v[64];
	fmt_fill(mv.move, v, sizeof v);
	emit("%s move=%s", rc ? errname(errno) : "ok", v);
}

static void cmd_wake(struct cmd *c)
{
	uintptr_t s; uint64_t l;
	if (!get_range(c, 1, &s, &l)) USAGE("wake NAME FIRST COUNT");
	if (cur_fd() < 0) USAGE("no uffd");
	struct uffdio_range r = {s, l};
	int rc = ioctl(cur_fd(), UFFDIO_WAKE, &r);
	emit("%s", rc ? errname(errno) : "ok");
}

static void cmd_scan(struct cmd *c)
{
	struct mapping *m;
	uintptr_t s; uint64_t l;
	if (!get_range(c, 1, &s, &l) || !(m = find_map(c->argv[1])))
		USAGE("scan NAME FIRST COUNT [wp] [check] [mask=] [anyof=] [inv=] [ret=] [max=] [vec=]");
	struct k_pm_scan_arg a = {.size = sizeof a, .start = s, .end = s + l, .return_mask = 0x1ff};
	uint64_t vecn = 64;
	for (int i = 4; i < c->argc; i++) {
		const char *w = c->argv[i];
		if (!strcmp(w, "wp")) a.flags |= K_PM_SCAN_WP_MATCHING;
		else if (!strcmp(w, "check")) a.flags |= K_PM_SCAN_CHECK_WPASYNC;
		else if (!strncmp(w, "mask=", 5)) { if (!parse_cats(w + 5, &a.category_mask)) USAGE("cats"); }
		else if (!strncmp(w, "anyof=", 6)) { if (!parse_cats(w + 6, &a.category_anyof_mask)) USAGE("cats"); }
		else if (!strncmp(w, "inv=", 4)) { if (!parse_cats(w + 4, &a.category_inverted)) USAGE("cats"); }
		else if (!strncmp(w, "ret=", 4)) { if (!parse_cats(w + 4, &a.return_mask)) USAGE("cats"); }
		else if (!strncmp(w, "max=", 4)) a.max_pages = strtoull(w + 4, NULL, 0);
		else if (!strncmp(w, "vec=", 4)) vecn = strtoull(w + 4, NULL, 0);
		else USAGE("bad scan option");
	}
	struct k_page_region *vec = calloc(vecn ? vecn : 1, sizeof *vec);
	a.vec = vecn ? (uintptr_t)vec : 0;
	a.vec_len = vecn;
	int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
	long r = ioctl(fd, K_PAGEMAP_SCAN, &a);
	int e = r < 0 ? errno : 0;
	close(fd);
	char we[96];
	addr_name(a.walk_end, we, sizeof we);
	if (r < 0) {
		emit("scan: %s walk_end=%s", errname(e), we);
		r = 0;
		for (uint64_t i = 0; i < vecn && vec[i].end; i++) r++;
	} else {
		emit("scan: regions=%ld walk_end=%s", r, we);
	}
	for (long i = 0; i < r; i++) {
		char cats[160];
		fmt_cats(vec[i].categories, cats, sizeof cats);
		long p0 = ((long)vec[i].start - (long)m->base) / (long)PG;
		long p1 = ((long)vec[i].end - (long)m->base) / (long)PG - 1;
		if (p0 == p1) emit("  region %s %ld: %s", m->name, p0, cats);
		else emit("  region %s %ld-%ld: %s", m->name, p0, p1, cats);
	}
	free(vec);
}

/* Accesses: run on an executor (worker thread or child). */
static void fmt_vals(const uint8_t *v, size_t n, char *buf, size_t bn)
{
	size_t len = 0, i = 0;
	buf[0] = 0;
	while (i < n) {
		size_t j = i + 1;
		while (j < n && v[j] == v[i]) j++;
		if (j - i > 1) len += snprintf(buf + len, bn - len, "%s0x%02x*%zu", len ? " " : "", v[i], j - i);
		else len += snprintf(buf + len, bn - len, "%s0x%02x", len ? " " : "", v[i]);
		if (len >= bn) break;
		i = j;
	}
}

static void cmd_access(struct cmd *c)
{
	const char *op = c->argv[0];
	bool wr = !strcmp(op, "write");
	bool kw = !strcmp(op, "kwrite"), kr = !strcmp(op, "kread");
	uintptr_t a;
	uint8_t b = 0;
	uint64_t cnt = 1;
	int ai = wr || kw ? 4 : 3;
	if (c->argc < (wr || kw ? 4 : 3) || !parse_loc(c->argv[1], c->argv[2], &a, NULL) ||
	    ((wr || kw) && !parse_byte(c->argv[3], &b)))
		USAGE("write NAME PAGE BYTE [COUNT] | read NAME PAGE [COUNT] | kwrite NAME PAGE BYTE | kread NAME PAGE");
	if (c->argc > ai) cnt = strtoull(c->argv[ai], NULL, 0);
	char what[160];
	size_t wl;
	if (cnt > 1) wl = snprintf(what, sizeof what, "%s %s %s-%llu", op, c->argv[1], c->argv[2],
			      (unsigned long long)(strtoull(c->argv[2], NULL, 0) + cnt - 1));
	else wl = snprintf(what, sizeof what, "%s %s %s", op, c->argv[1], c->argv[2]);
	if (wr || kw) snprintf(what + wl, sizeof what - wl, " %s", c->argv[3]);
	if (kw || kr) {
		ssize_t r;
		if (kw) {
			if (write(pipe_k[1], &b, 1) != 1) { emit("%s pipe error", what); return; }
			r = read(pipe_k[0], (void *)a, 1);
		} else {
			r = write(pipe_k[1], (void *)a, 1);
		}
		int e = r < 0 ? errno : 0;
		uint8_t junk;
		/* drain whatever is left in the pipe */
		if ((kw && r != 1) || (kr && r == 1)) {
			ssize_t d = read(pipe_k[0], &junk, 1);
			(void)d;
		}
		if (kr && r == 1) emit("%s = 0x%02x", what, junk);
		else emit("%s %s", what, e ? errname(e) : "ok");
		return;
	}
	uint8_t *vals = calloc(cnt, 1);
	for (uint64_t i = 0; i < cnt; i++) {
		int sig = access_byte(a + i * PG, wr, b, &vals[i]);
		if (sig) {
			char at[96] = "";
			if (cnt > 1) {
				char nm[80];
				addr_name(a + i * PG, nm, sizeof nm);
				snprintf(at, sizeof at, " at %s", nm);
			}
			emit("%s %s%s", what, sigdesc(sig, tl_code), at);
			free(vals);
			return;
		}
	}
	if (wr) {
		emit("%s ok", what);
	} else {
		char vs[512];
		fmt_vals(vals, cnt, vs, sizeof vs);
		emit("%s = %s", what, vs);
	}
	free(vals);
}

/* main-thread access; only for memory that cannot block in a userfault */
static void cmd_poke(struct cmd *c)
{
	uintptr_t a;
	uint8_t b;
	if (c->argc < 4 || !parse_loc(c->argv[1], c->argv[2], &a, NULL) || !parse_byte(c->argv[3], &b))
		USAGE("poke NAME PAGE BYTE");
	uint8_t junk;
	int sig = access_byte(a, true, b, &junk);
	emit("%s", sig ? sigdesc(sig, tl_code) : "ok");
}

static void cmd_populate(struct cmd *c)
{
	uintptr_t s; uint64_t l;
	if (!get_range(c, 1, &s, &l) || c->argc < 5) USAGE("populate NAME FIRST COUNT read|write");
	int adv = !strcmp(c->argv[4], "write") ? MADV_POPULATE_WRITE : MADV_POPULATE_READ;
	int r = madvise((void *)s, l, adv);
	emit("populate %s %s %s %s %s", c->argv[1], c->argv[2], c->argv[3], c->argv[4], r ? errname(errno) : "ok");
}

static bool feature_available(uint64_t bit)
{
	int fd = open_uffd(false, O_CLOEXEC | O_NONBLOCK);
	if (fd < 0) return false;
	struct uffdio_api a = {.api = UFFD_API, .features = 0};
	bool ok = ioctl(fd, UFFDIO_API, &a) == 0 && (a.features & bit);
	close(fd);
	return ok;
}

static bool soft_dirty_configured(void)
{
	/* with CONFIG_MEM_SOFT_DIRTY new VMAs carry VM_SOFTDIRTY ("sd" in VmFlags) */
	FILE *f = fopen("/proc/self/smaps", "re");
	if (!f) return false;
	char line[1024];
	bool sd = false;
	while (fgets(line, sizeof line, f))
		if (!strncmp(line, "VmFlags:", 8) && strstr(line, " sd")) { sd = true; break; }
	fclose(f);
	return sd;
}

static bool pagemap_scan_available(void)
{
	struct k_pm_scan_arg a = {.size = sizeof a, .start = (uintptr_t)srcbuf, .end = (uintptr_t)srcbuf + PG};
	struct k_page_region r;
	a.vec = (uintptr_t)&r;
	a.vec_len = 1;
	a.return_mask = 1;
	int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
	long rc = ioctl(fd, K_PAGEMAP_SCAN, &a);
	close(fd);
	return rc >= 0;
}

static void cmd_require(struct cmd *c)
{
	for (int i = 1; i < c->argc; i++) {
		const char *w = c->argv[i];
		bool neg = w[0] == '!';
		if (neg) w++;
		bool ok;
		if (!strcmp(w, "swap")) {
			FILE *f = fopen("/proc/swaps", "re");
			int n = 0;
			char line[512];
			while (f && fgets(line, sizeof line, f)) n++;
			if (f) fclose(f);
			ok = n > 1;
		} else if (!strcmp(w, "thp")) {
			FILE *f = fopen("/sys/kernel/mm/transparent_hugepage/enabled", "re");
			char line[256] = "";
			if (f) { if (!fgets(line, sizeof line, f)) line[0] = 0; fclose(f); }
			ok = f && !strstr(line, "[never]");
		} else if (!strcmp(w, "softdirty")) {
			ok = soft_dirty_configured();
		} else if (!strcmp(w, "pagemap_scan")) {
			ok = pagemap_scan_available();
		} else {
			uint64_t bit = 0;
			for (size_t k = 0; k < sizeof feat_names / sizeof feat_names[0]; k++)
				if (!strcmp(w, feat_names[k].name)) bit = feat_names[k].bit;
			if (!bit) USAGE("require swap|thp|softdirty|pagemap_scan|FEATURE");
			ok = feature_available(bit);
		}
		if (ok == neg) {
			emit("SKIP requirement not met: %s", c->argv[i]);
			fflush(stdout);
			_exit(0);
		}
	}
	emit("ok");
}

/* process_vm_readv / process_vm_writev between the harness's processes.
 *   pvread  WHO LNAME LFIRST LCOUNT [...] <- RNAME RFIRST RCOUNT [...] [flags=N] [liovcnt=N] [riovcnt=N]
 *   pvwrite WHO LNAME LFIRST LCOUNT [...] -> RNAME RFIRST RCOUNT [...] [...]
 * WHO is the remote process: self, child (from the worker), parent (from the
 * child) or nopid (a pid that cannot exist: ESRCH). The local iovecs address
 * the executor's own memory. A COUNT written -N is an iov_len of -N bytes.
 * Prints "ok n=BYTES" (the return value) or the errno name. */
#define PVM_MAXIOV 1100
static bool parse_iov_len(const char *s, uint64_t *len)
{
	if (s[0] == '-') {
		char *e;
		long long v = strtoll(s, &e, 0);
		if (e == s || *e) return false;
		*len = (uint64_t)v;
		return true;
	}
	return parse_pages(s, len);
}

static void cmd_pvm(struct cmd *c)
{
	bool wr = !strcmp(c->argv[0], "pvwrite");
	const char *arrow = wr ? "->" : "<-";
	static __thread struct iovec lv[PVM_MAXIOV], rv[PVM_MAXIOV];
	unsigned long nl = 0, nr = 0, flags = 0;
	long lcnt = -1, rcnt = -1;
	memset(lv, 0, sizeof lv); /* entries past the parsed ones (liovcnt=/riovcnt=) are empty */
	memset(rv, 0, sizeof rv);
	if (c->argc < 2) USAGE("pvread|pvwrite WHO LNAME LFIRST LCOUNT... <-|-> RNAME RFIRST RCOUNT... [flags=N]");
	pid_t pid;
	const char *who = c->argv[1];
	if (!strcmp(who, "self")) pid = getpid();
	else if (!strcmp(who, "child") && !in_child && child_pid) pid = child_pid;
	else if (!strcmp(who, "parent") && in_child) pid = getppid();
	else if (!strcmp(who, "nopid")) pid = 0x7fffffff;
	else USAGE("pvread WHO: self|child|parent|nopid");
	int i = 2;
	bool remote = false;
	while (i < c->argc) {
		const char *w = c->argv[i];
		if (!strcmp(w, arrow)) { remote = true; i++; continue; }
		if (!strncmp(w, "flags=", 6)) { flags = strtoul(w + 6, NULL, 0); i++; continue; }
		if (!strncmp(w, "liovcnt=", 8)) { lcnt = strtol(w + 8, NULL, 0); i++; continue; }
		if (!strncmp(w, "riovcnt=", 8)) { rcnt = strtol(w + 8, NULL, 0); i++; continue; }
		uintptr_t a;
		uint64_t len;
		if (i + 3 > c->argc || !parse_loc(c->argv[i], c->argv[i + 1], &a, NULL) ||
		    !parse_iov_len(c->argv[i + 2], &len))
			USAGE("pvread|pvwrite WHO LNAME LFIRST LCOUNT... <-|-> RNAME RFIRST RCOUNT... [flags=N]");
		struct iovec *v = remote ? &rv[nr++] : &lv[nl++];
		v->iov_base = (void *)a;
		v->iov_len = len;
		i += 3;
	}
	if (!remote) USAGE("pvread|pvwrite: missing <- or ->");
	if (lcnt >= 0) nl = lcnt;
	if (rcnt >= 0) nr = rcnt;
	if (nl > PVM_MAXIOV) nl = PVM_MAXIOV;
	if (nr > PVM_MAXIOV) nr = PVM_MAXIOV;
	ssize_t r = wr ? process_vm_writev(pid, lv, nl, rv, nr, flags)
		       : process_vm_readv(pid, lv, nl, rv, nr, flags);
	if (r < 0) emit("%s", errname(errno));
	else emit("ok n=%zd", r);
}

/* Commands valid on every executor. Returns false if unknown. */
static bool run_local(struct cmd *c)
{
	const char *op = c->argv[0];
	if (!strcmp(op, "write") || !strcmp(op, "read") || !strcmp(op, "kwrite") || !strcmp(op, "kread"))
		cmd_access(c);
	else if (!strcmp(op, "populate")) cmd_populate(c);
	else if (!strcmp(op, "pagemap")) cmd_pagemap(c);
	else if (!strcmp(op, "pageid")) cmd_pageid(c);
	else if (!strcmp(op, "vmas")) cmd_vmas(c);
	else if (!strcmp(op, "mprotect")) cmd_mprotect(c);
	else if (!strcmp(op, "madvise")) cmd_madvise(c);
	else if (!strcmp(op, "munmap")) cmd_munmap(c);
	else if (!strcmp(op, "clear_refs")) cmd_clear_refs(c);
	else if (!strcmp(op, "scan") || !strcmp(op, "pagemap_scan")) cmd_scan(c);
	else if (!strcmp(op, "thp")) cmd_thp(c);
	else if (!strcmp(op, "pvread") || !strcmp(op, "pvwrite")) cmd_pvm(c);
	else if (!strcmp(op, "sleep")) { usleep(atoi(c->argc > 1 ? c->argv[1] : "10") * 1000); emit("ok"); }
	else return false;
	return true;
}

static void split(char *line, struct cmd *c)
{
	c->argc = 0;
	for (char *save, *t = strtok_r(line, " \t\r\n", &save); t && c->argc < MAXARG;
	     t = strtok_r(NULL, " \t\r\n", &save))
		c->argv[c->argc++] = t;
}

/* Executor loop: used by the worker thread and by the forked child. */
static void exec_loop(int cmd_rd, int res_wr)
{
	tl_out_fd = res_wr;
	FILE *in = fdopen(cmd_rd, "r");
	char line[1024];
	while (fgets(line, sizeof line, in)) {
		struct cmd c;
		char copy[1024];
		snprintf(copy, sizeof copy, "%s", line);
		split(copy, &c);
		if (c.argc == 0) { emit("\x01"); continue; }
		if (!strcmp(c.argv[0], "exit")) { emit("\x01"); _exit(0); }
		/* "mremap OLD NEW [FIRST COUNT] @ADDR" from main (child: mremap): ADDR is the slot
		 * main named NEW at; the word is not part of the echoed command */
		uintptr_t remap_addr = 0;
		if (in_child && !strcmp(c.argv[0], "mremap") && c.argc > 1 && c.argv[c.argc - 1][0] == '@')
			remap_addr = strtoull(c.argv[--c.argc] + 1, NULL, 0);
		/* result lines of non-access commands carry the command as prefix */
		static const char *plain[] = {"write", "read", "kwrite", "kread", "populate", "pagemap",
					      "pageid", "vmas", "scan", NULL};
		bool is_plain = false;
		for (int i = 0; plain[i]; i++)
			if (!strcmp(c.argv[0], plain[i])) is_plain = true;
		char pfx[1024];
		if (!is_plain) {
			size_t pl = 0;
			for (int i = 0; i < c.argc; i++) pl += snprintf(pfx + pl, sizeof pfx - pl, "%s%s", i ? " " : "", c.argv[i]);
			tl_prefix = pfx;
		}
		bool known = run_local(&c);
		if (!known) {
			/* generic commands the worker may run on behalf of main ("async") */
			const char *op = c.argv[0];
			if (!in_child && !strcmp(op, "copy")) cmd_copy(&c);
			else if (!in_child && !strcmp(op, "zeropage")) cmd_zeropage(&c);
			else if (!in_child && !strcmp(op, "wp")) cmd_wp(&c, true);
			else if (!in_child && !strcmp(op, "unwp")) cmd_wp(&c, false);
			else if (!in_child && !strcmp(op, "move")) cmd_move(&c);
			else if (in_child && !strcmp(op, "mremap") && remap_addr) do_mremap(&c, remap_addr);
			else emit("USAGE unknown command on executor: %s", op);
		}
		tl_prefix = NULL;
		emit("\x01");
	}
	_exit(0);
}

static void *worker_main(void *arg)
{
	int *fds = arg;
	worker_tid = gettid_();
	__atomic_store_n(&ex_worker.tid, worker_tid, __ATOMIC_RELEASE);
	exec_loop(fds[0], fds[1]);
	return NULL;
}

static void cmd_fork(void)
{
	if (ex_child.alive) { emit("USAGE a child is already running"); return; }
	int cp[2], rp[2];
	if (pipe2(cp, O_CLOEXEC) || pipe2(rp, O_CLOEXEC)) { emit("%s", errname(errno)); return; }
	fflush(stdout);
	pid_t pid = fork();
	if (pid < 0) { emit("%s", errname(errno)); return; }
	if (pid == 0) {
		in_child = true;
		/* the child must not hold references to the parent's uffds */
		for (int i = 0; i < n_uffds; i++)
			if (uffds[i].open) close(uffds[i].fd);
		close(ctl_efd);
		close(cp[1]);
		close(rp[0]);
		close(ex_worker.cmd_wr);
		close(ex_worker.res_rd);
		exec_loop(cp[0], rp[1]);
	}
	close(cp[0]);
	close(rp[1]);
	fcntl(rp[0], F_SETFL, O_NONBLOCK);
	child_pid = pid;
	ex_child = (struct executor){.label = "child", .alive = true, .pid = pid, .tid = pid,
				     .cmd_wr = cp[1], .res_rd = rp[0]};
	emit("ok");
}

static void child_reap(bool kill_it)
{
	if (!child_pid) return;
	if (kill_it) kill(child_pid, SIGKILL);
	int st = 0;
	pid_t r = waitpid(child_pid, &st, 0);
	if (r == child_pid) {
		if (WIFEXITED(st)) emit("child exited status=%d", WEXITSTATUS(st));
		else if (WIFSIGNALED(st)) emit("child killed by signal %d", WTERMSIG(st));
	}
	if (ex_child.cmd_wr > 0) close(ex_child.cmd_wr);
	if (ex_child.res_rd > 0) close(ex_child.res_rd);
	ex_child.alive = false;
	ex_child.pending = 0;
	child_pid = 0;
}

/* "child: mremap OLD NEW [FIRST COUNT]": main names NEW at its next arena slot, as a
 * mremap of its own would (so that the REMAP event the child raises prints NEW), and
 * sends the child the slot's address as a last "@ADDR" word. */
static void child_mremap_send(struct cmd *c)
{
	if (c->argc < 4) USAGE("mremap OLD NEW [FIRST COUNT]");
	struct mapping *o = find_map(c->argv[2]);
	if (!o || find_map(c->argv[3])) USAGE("bad names");
	uintptr_t start = o->base;
	uint64_t len = o->len;
	if (c->argc >= 6) {
		uint64_t off;
		if (!parse_pages(c->argv[4], &off) || !parse_pages(c->argv[5], &len)) USAGE("bad range");
		start = o->base + off;
	}
	uintptr_t addr = arena_next;
	struct mapping *m = &maps[nmaps];
	*m = *o;
	snprintf(m->name, sizeof m->name, "%s", c->argv[3]);
	m->base = addr; m->len = len; m->off = o->off + (start - o->base);
	__atomic_store_n(&nmaps, nmaps + 1, __ATOMIC_RELEASE);
	arena_next += ((len + PMD_SZ - 1) & ~(PMD_SZ - 1)) + PMD_SZ;
	char shown[1024] = "", line[1100];
	size_t sl = 0;
	for (int i = 1; i < c->argc; i++) sl += snprintf(shown + sl, sizeof shown - sl, "%s%s", i > 1 ? " " : "", c->argv[i]);
	snprintf(line, sizeof line, "%s @%#lx", shown, (unsigned long)addr);
	exec_send_as(&ex_child, line, shown);
}

static void cmd_handler(struct cmd *c)
{
	int p = 0;
	uint8_t byte = 0;
	for (int i = 1; i < c->argc; i++) {
		const char *w = c->argv[i];
		if (!strcmp(w, "none") || !strcmp(w, "log")) ;
		else if (!strcmp(w, "off")) p |= POL_OFF;
		else if (!strcmp(w, "unwp")) p |= POL_UNWP;
		else if (!strcmp(w, "zeropage")) p |= POL_ZERO;
		else if (!strcmp(w, "continue")) p |= POL_CONT;
		else if (!strcmp(w, "continuewp")) p |= POL_CONTWP;
		else if (!strcmp(w, "wake")) p |= POL_WAKE;
		else if (!strcmp(w, "record") || !strcmp(w, "auto")) p |= POL_UNWP | POL_ZERO | POL_CONT;
		else if ((!strcmp(w, "copy") || !strcmp(w, "copywp")) && i + 1 < c->argc &&
			 parse_byte(c->argv[i + 1], &byte)) {
			p |= !strcmp(w, "copy") ? POL_COPY : POL_COPYWP;
			i++;
		} else USAGE("handler off|none|unwp|copy BYTE|copywp BYTE|zeropage|continue|continuewp|wake|auto");
	}
	pthread_mutex_lock(&st_mu);
	policy = p;
	policy_byte = byte;
	pthread_mutex_unlock(&st_mu);
	emit("ok");
}

/* Run one script line in main. */
static void run_line(char *line)
{
	char copy[1024];
	snprintf(copy, sizeof copy, "%s", line);
	struct cmd c;
	split(copy, &c);
	if (c.argc == 0 || c.argv[0][0] == '#') return;

	/* echo the command (normalised spacing) */
	char echo[1024] = "";
	size_t el = 0;
	for (int i = 0; i < c.argc; i++) el += snprintf(echo + el, sizeof echo - el, "%s%s", i ? " " : "", c.argv[i]);

	const char *op = c.argv[0];
	bool needs_sync = !strcmp(op, "handler") || (!strcmp(op, "uffd") && c.argc > 1 && !strcmp(c.argv[1], "close"));
	if (needs_sync && !strcmp(op, "uffd")) {
		/* take the uffd out of the handler's poll set before closing it */
		int id = c.argc > 2 ? atoi(c.argv[2] + (c.argv[2][0] == 'u')) : cur_uffd;
		pthread_mutex_lock(&st_mu);
		if (id >= 0 && id < n_uffds) uffds[id].open = false;
		pthread_mutex_unlock(&st_mu);
		handler_sync(); /* cmd_uffd then closes the fd */
	}

	pthread_mutex_lock(&out_mu);
	pq_flush_locked();
	printf("> %s\n", echo);
	fflush(stdout);

	if (!strcmp(op, "child:") || !strcmp(op, "child")) {
		if (c.argc >= 2 && !strcmp(c.argv[1], "kill")) {
			child_reap(true);
		} else if (c.argc >= 2 && !strcmp(c.argv[1], "exit")) {
			if (ex_child.alive) exec_send(&ex_child, "exit");
			pq_flush_locked();
			pthread_mutex_unlock(&out_mu);
			settle();
			pthread_mutex_lock(&out_mu);
			child_reap(false);
		} else if (!ex_child.alive) {
			emit("USAGE no child");
		} else if (c.argc >= 2 && !strcmp(c.argv[1], "mremap")) {
			child_mremap_send(&c);
		} else {
			char rest[1024] = "";
			size_t rl = 0;
			for (int i = 1; i < c.argc; i++) rl += snprintf(rest + rl, sizeof rest - rl, "%s%s", i > 1 ? " " : "", c.argv[i]);
			exec_send(&ex_child, rest);
		}
	} else if (!strcmp(op, "async")) {
		char rest[1024] = "";
		size_t rl = 0;
		for (int i = 1; i < c.argc; i++) rl += snprintf(rest + rl, sizeof rest - rl, "%s%s", i > 1 ? " " : "", c.argv[i]);
		exec_send(&ex_worker, rest);
	} else if (!strcmp(op, "write") || !strcmp(op, "read") || !strcmp(op, "kwrite") || !strcmp(op, "kread") ||
		   !strcmp(op, "populate") || !strcmp(op, "pvread") || !strcmp(op, "pvwrite")) {
		exec_send(&ex_worker, echo);
	} else if (!strcmp(op, "map")) cmd_map(&c);
	else if (!strcmp(op, "alias")) cmd_alias(&c);
	else if (!strcmp(op, "mremap")) cmd_mremap(&c);
	else if (!strcmp(op, "uffd")) cmd_uffd(&c);
	else if (!strcmp(op, "register")) cmd_register(&c);
	else if (!strcmp(op, "unregister")) cmd_unregister(&c);
	else if (!strcmp(op, "wp")) cmd_wp(&c, true);
	else if (!strcmp(op, "unwp")) cmd_wp(&c, false);
	else if (!strcmp(op, "copy")) cmd_copy(&c);
	else if (!strcmp(op, "zeropage")) cmd_zeropage(&c);
	else if (!strcmp(op, "continue")) cmd_continue(&c);
	else if (!strcmp(op, "poison")) cmd_poison(&c);
	else if (!strcmp(op, "move")) cmd_move(&c);
	else if (!strcmp(op, "wake")) cmd_wake(&c);
	else if (!strcmp(op, "fork")) cmd_fork();
	else if (!strcmp(op, "poke")) cmd_poke(&c);
	else if (!strcmp(op, "handler")) cmd_handler(&c);
	else if (!strcmp(op, "require")) cmd_require(&c);
	else if (!run_local(&c)) emit("USAGE unknown command: %s", op);

	pq_flush_locked();
	pthread_mutex_unlock(&out_mu);
	if (!strcmp(op, "handler") || !strcmp(op, "uffd")) handler_sync();
	settle();
}

int main(int argc, char **argv)
{
	if (argc < 2) {
		fprintf(stderr, "usage: %s SCENARIO.scn (or - for stdin)\n", argv[0]);
		return 1;
	}
	FILE *in = strcmp(argv[1], "-") ? fopen(argv[1], "re") : stdin;
	if (!in) { perror(argv[1]); return 1; }
	setvbuf(stdout, NULL, _IOFBF, 1 << 16);
	main_tid = gettid_();

	/* Pin every thread (and forked children) to one CPU. Per-CPU LRU batches
	 * hold extra folio references; on one CPU the kernel's local drains see
	 * them all, which makes MADV_PAGEOUT and COW-vs-reuse decisions
	 * deterministic. KUFFD_CPU=none disables pinning. */
	const char *cpu = getenv("KUFFD_CPU");
	if (!cpu || strcmp(cpu, "none")) {
		cpu_set_t set;
		CPU_ZERO(&set);
		CPU_SET(cpu ? atoi(cpu) : 0, &set);
		if (sched_setaffinity(0, sizeof set, &set)) perror("sched_setaffinity");
	}

	struct sigaction sa = {0};
	sa.sa_sigaction = on_signal;
	sa.sa_flags = SA_SIGINFO | SA_NODEFER;
	sigaction(SIGSEGV, &sa, NULL);
	sigaction(SIGBUS, &sa, NULL);
	signal(SIGALRM, on_alarm);
	signal(SIGPIPE, SIG_IGN);
	alarm(getenv("KUFFD_TIMEOUT") ? atoi(getenv("KUFFD_TIMEOUT")) : 60);

	labels = mmap(NULL, sizeof *labels, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	srcbuf = mmap(NULL, 64UL << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (labels == MAP_FAILED || srcbuf == MAP_FAILED) { perror("mmap"); return 1; }

	/* arena for named mappings: find a free 1 GiB-aligned 64 GiB range, then release it */
	size_t asz = 64UL << 30;
	void *ar = mmap(NULL, asz + (1UL << 30), PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (ar == MAP_FAILED) { perror("arena"); return 1; }
	arena_next = ((uintptr_t)ar + (1UL << 30) - 1) & ~((1UL << 30) - 1);
	munmap(ar, asz + (1UL << 30));

	if (pipe2(pipe_k, O_CLOEXEC)) { perror("pipe"); return 1; }
	ctl_efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);

	/* worker */
	int cp[2], rp[2];
	if (pipe2(cp, O_CLOEXEC) || pipe2(rp, O_CLOEXEC)) { perror("pipe"); return 1; }
	fcntl(rp[0], F_SETFL, O_NONBLOCK);
	ex_worker.alive = true;
	ex_worker.pid = getpid();
	ex_worker.cmd_wr = cp[1];
	ex_worker.res_rd = rp[0];
	static int wfds[2];
	wfds[0] = cp[0];
	wfds[1] = rp[1];
	pthread_t wt, ht;
	pthread_create(&wt, NULL, worker_main, wfds);
	while (!__atomic_load_n(&ex_worker.tid, __ATOMIC_ACQUIRE)) usleep(100);
	pthread_create(&ht, NULL, handler_main, NULL);
	handler_sync();

	char line[1024];
	while (fgets(line, sizeof line, in)) run_line(line);

	pthread_mutex_lock(&out_mu);
	pq_flush_locked();
	if (child_pid) child_reap(true);
	pthread_mutex_unlock(&out_mu);
	fflush(stdout);
	_exit(0);
}
