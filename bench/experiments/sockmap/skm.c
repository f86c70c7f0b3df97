// BPF sockmap TCP relay measurement. Raw bpf(2), no libbpf.
// usage: skm correct | bench <direct|sockmap|splice> <MiB> | stall <direct|sockmap|splice> | eof
#define _GNU_SOURCE
#include <stdio.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>
#include <stdatomic.h>
#include <unistd.h>
#include <errno.h>
#include <fcntl.h>
#include <time.h>
#include <poll.h>
#include <pthread.h>
#include <dirent.h>
#include <sys/syscall.h>
#include <sys/socket.h>
#include <sys/ioctl.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/time.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <linux/sockios.h>
#include <linux/bpf.h>

#ifndef SO_COOKIE
#define SO_COOKIE 57
#endif

/* ---- instruction macros (as in samples/bpf/bpf_insn.h) ---- */
#define BPF_MOV64_REG(DST, SRC) ((struct bpf_insn){.code = BPF_ALU64 | BPF_MOV | BPF_X, .dst_reg = DST, .src_reg = SRC})
#define BPF_MOV64_IMM(DST, IMM) ((struct bpf_insn){.code = BPF_ALU64 | BPF_MOV | BPF_K, .dst_reg = DST, .imm = IMM})
#define BPF_ALU64_IMM(OP, DST, IMM) ((struct bpf_insn){.code = BPF_ALU64 | BPF_OP(OP) | BPF_K, .dst_reg = DST, .imm = IMM})
#define BPF_LDX_MEM(SZ, DST, SRC, OFF) ((struct bpf_insn){.code = BPF_LDX | BPF_SIZE(SZ) | BPF_MEM, .dst_reg = DST, .src_reg = SRC, .off = OFF})
#define BPF_STX_MEM(SZ, DST, SRC, OFF) ((struct bpf_insn){.code = BPF_STX | BPF_SIZE(SZ) | BPF_MEM, .dst_reg = DST, .src_reg = SRC, .off = OFF})
#define BPF_JMP_IMM(OP, DST, IMM, OFF) ((struct bpf_insn){.code = BPF_JMP | BPF_OP(OP) | BPF_K, .dst_reg = DST, .off = OFF, .imm = IMM})
#define BPF_LD_IMM64_RAW(DST, SRC, IMM) \
	((struct bpf_insn){.code = BPF_LD | BPF_DW | BPF_IMM, .dst_reg = DST, .src_reg = SRC, .imm = (__u32)(IMM)}), \
	((struct bpf_insn){.code = 0, .imm = ((__u64)(IMM)) >> 32})
#define BPF_LD_MAP_FD(DST, FD) BPF_LD_IMM64_RAW(DST, BPF_PSEUDO_MAP_FD, FD)
#define BPF_EMIT_CALL(F) ((struct bpf_insn){.code = BPF_JMP | BPF_CALL, .imm = F})
#define BPF_EXIT_INSN() ((struct bpf_insn){.code = BPF_JMP | BPF_EXIT})

static long sys_bpf(int cmd, union bpf_attr *a) { return syscall(__NR_bpf, cmd, a, sizeof(*a)); }
#define DIE(...) do { fprintf(stderr, __VA_ARGS__); fprintf(stderr, " errno=%d (%s)\n", errno, strerror(errno)); exit(2); } while (0)

static int map_fd = -1, prog_fd = -1;
static char vlog[65536];

static void bpf_setup(void)
{
	union bpf_attr a;
	memset(&a, 0, sizeof(a));
	a.map_type = BPF_MAP_TYPE_SOCKHASH;
	a.key_size = 8;
	a.value_size = 4;
	a.max_entries = 64;
	map_fd = sys_bpf(BPF_MAP_CREATE, &a);
	if (map_fd < 0) DIE("BPF_MAP_CREATE sockhash");

	struct bpf_insn prog[] = {
		BPF_MOV64_REG(BPF_REG_6, BPF_REG_1),
		BPF_LDX_MEM(BPF_W, BPF_REG_2, BPF_REG_6, offsetof(struct __sk_buff, len)),
		BPF_JMP_IMM(BPF_JNE, BPF_REG_2, 0, 2),
		BPF_MOV64_IMM(BPF_REG_0, SK_PASS),
		BPF_EXIT_INSN(),
		BPF_MOV64_REG(BPF_REG_1, BPF_REG_6),
		BPF_EMIT_CALL(BPF_FUNC_get_socket_cookie),
		BPF_STX_MEM(BPF_DW, BPF_REG_10, BPF_REG_0, -8),
		BPF_MOV64_REG(BPF_REG_1, BPF_REG_6),
		BPF_LD_MAP_FD(BPF_REG_2, map_fd),
		BPF_MOV64_REG(BPF_REG_3, BPF_REG_10),
		BPF_ALU64_IMM(BPF_ADD, BPF_REG_3, -8),
		BPF_MOV64_IMM(BPF_REG_4, 0),
		BPF_EMIT_CALL(BPF_FUNC_sk_redirect_hash),
		BPF_EXIT_INSN(),
	};
	memset(&a, 0, sizeof(a));
	a.prog_type = BPF_PROG_TYPE_SK_SKB;
	a.insns = (uint64_t)(uintptr_t)prog;
	a.insn_cnt = sizeof(prog) / sizeof(prog[0]);
	a.license = (uint64_t)(uintptr_t)"GPL";
	a.log_buf = (uint64_t)(uintptr_t)vlog;
	a.log_size = sizeof(vlog);
	a.log_level = 1;
	prog_fd = sys_bpf(BPF_PROG_LOAD, &a);
	if (prog_fd < 0) { fprintf(stderr, "verifier log:\n%s\n", vlog); DIE("BPF_PROG_LOAD"); }

	memset(&a, 0, sizeof(a));
	a.target_fd = map_fd;
	a.attach_bpf_fd = prog_fd;
	a.attach_type = BPF_SK_SKB_STREAM_VERDICT;
	if (sys_bpf(BPF_PROG_ATTACH, &a) < 0) DIE("BPF_PROG_ATTACH stream_verdict");
}

static uint64_t cookie(int fd)
{
	uint64_t c = 0; socklen_t l = sizeof(c);
	if (getsockopt(fd, SOL_SOCKET, SO_COOKIE, &c, &l) < 0) DIE("SO_COOKIE");
	return c;
}

static void map_put(uint64_t key, int fd)
{
	union bpf_attr a; uint32_t v = fd;
	memset(&a, 0, sizeof(a));
	a.map_fd = map_fd; a.key = (uint64_t)(uintptr_t)&key; a.value = (uint64_t)(uintptr_t)&v; a.flags = BPF_ANY;
	if (sys_bpf(BPF_MAP_UPDATE_ELEM, &a) < 0) DIE("BPF_MAP_UPDATE_ELEM");
}

/* ---- sockets ---- */
static int listener(int *port)
{
	int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
	setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	if (bind(l, (void *)&sa, sizeof(sa)) < 0 || listen(l, 16) < 0) DIE("bind/listen");
	socklen_t sl = sizeof(sa); getsockname(l, (void *)&sa, &sl); *port = ntohs(sa.sin_port);
	return l;
}
static int connect_to(int port)
{
	int s = socket(AF_INET, SOCK_STREAM, 0);
	struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port), .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	if (connect(s, (void *)&sa, sizeof(sa)) < 0) DIE("connect");
	return s;
}

enum { M_DIRECT, M_SOCKMAP, M_SPLICE };
static int C = -1, A = -1, B = -1, S = -1, mode;
static const char *mname[] = {"direct", "sockmap", "splice"};

static void *splice_thr(void *arg)
{
	int *p = arg, src = p[0], dst = p[1], pp[2];
	if (pipe(pp) < 0) return NULL;
	for (;;) {
		ssize_t n = splice(src, NULL, pp[1], NULL, 1 << 20, SPLICE_F_MOVE | SPLICE_F_MORE);
		if (n <= 0) { shutdown(dst, SHUT_WR); break; }
		while (n > 0) {
			ssize_t w = splice(pp[0], NULL, dst, NULL, n, SPLICE_F_MOVE | SPLICE_F_MORE);
			if (w <= 0) return NULL;
			n -= w;
		}
	}
	return NULL;
}

static void topo(int m)
{
	int p1, p2;
	mode = m;
	if (m == M_SOCKMAP) bpf_setup();
	int L2 = listener(&p2);
	if (m == M_DIRECT) {
		C = connect_to(p2); S = accept(L2, NULL, NULL); close(L2); return;
	}
	int L1 = listener(&p1);
	C = connect_to(p1); A = accept(L1, NULL, NULL);
	B = connect_to(p2); S = accept(L2, NULL, NULL);
	close(L1); close(L2);
	if (A < 0 || S < 0) DIE("accept");
	if (m == M_SOCKMAP) {
		uint64_t ca = cookie(A), cb = cookie(B);
		map_put(ca, B); map_put(cb, A);
		printf("sockmap: cookie(A)=%lu -> B, cookie(B)=%lu -> A\n", (unsigned long)ca, (unsigned long)cb);
	} else {
		static int ab[2], ba[2]; pthread_t t;
		ab[0] = A; ab[1] = B; ba[0] = B; ba[1] = A;
		pthread_create(&t, NULL, splice_thr, ab); pthread_detach(t);
		pthread_create(&t, NULL, splice_thr, ba); pthread_detach(t);
	}
}

/* ---- pattern: prime-period random bytes; offset o -> pat[o % PER] ---- */
#define PER 1000003
#define CH (256 * 1024)
static unsigned char *pat;
static void pat_init(void)
{
	pat = malloc(PER + CH);
	uint64_t x = 88172645463325252ull;
	for (int i = 0; i < PER + CH; i++) { x ^= x << 13; x ^= x >> 7; x ^= x << 17; pat[i] = x; }
	memcpy(pat + PER, pat, CH);
}
static int verify(const unsigned char *b, size_t n, uint64_t off)
{
	while (n) {
		size_t po = off % PER, k = PER - po; if (k > n) k = n;
		if (memcmp(b, pat + po, k)) return -1;
		b += k; n -= k; off += k;
	}
	return 0;
}

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }

/* sender/receiver threads */
struct xfer { int fd; uint64_t total; int pattern; int verify; uint64_t done; uint64_t calls; int bad; uint64_t badoff; int do_shut; };
static void *send_thr(void *arg)
{
	struct xfer *x = arg; static unsigned char zero[CH];
	while (x->done < x->total) {
		size_t n = x->total - x->done; if (n > CH) n = CH;
		const void *src = x->pattern ? pat + x->done % PER : zero;
		ssize_t w = send(x->fd, src, n, 0);
		if (w < 0) { if (errno == EINTR) continue; perror("send"); break; }
		x->done += w; x->calls++;
	}
	if (x->do_shut) shutdown(x->fd, SHUT_WR);
	return NULL;
}
static void *recv_thr(void *arg)
{
	struct xfer *x = arg; unsigned char *b = malloc(CH);
	while (x->done < x->total) {
		ssize_t n = recv(x->fd, b, CH, 0);
		if (n < 0) { if (errno == EINTR) continue; perror("recv"); break; }
		if (n == 0) { fprintf(stderr, "recv: unexpected EOF at %lu\n", (unsigned long)x->done); break; }
		if (x->verify && !x->bad && verify(b, n, x->done)) { x->bad = 1; x->badoff = x->done; }
		x->done += n; x->calls++;
	}
	free(b);
	return NULL;
}

/* ---- CPU accounting ---- */
struct cpu { double ru_user, ru_sys; long kthr_ticks; long st_sys, st_soft, st_user, st_all; };
static long kthread_ticks(void)
{
	DIR *d = opendir("/proc"); struct dirent *e; long sum = 0; char path[300], buf[512];
	while ((e = readdir(d))) {
		if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
		snprintf(path, sizeof(path), "/proc/%s/stat", e->d_name);
		int fd = open(path, O_RDONLY); if (fd < 0) continue;
		ssize_t n = read(fd, buf, sizeof(buf) - 1); close(fd); if (n <= 0) continue; buf[n] = 0;
		char *lp = strchr(buf, '('), *rp = strrchr(buf, ')'); if (!lp || !rp) continue;
		if (strncmp(lp + 1, "kworker", 7) && strncmp(lp + 1, "ksoftirqd", 9)) continue;
		unsigned long ut, stt; /* fields after ')' : state ppid pgrp sess tty tpgid flags minflt cminflt majflt cmajflt utime stime */
		if (sscanf(rp + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &ut, &stt) == 2) sum += ut + stt;
	}
	closedir(d);
	return sum;
}
static void cpu_snap(struct cpu *c)
{
	struct rusage r; getrusage(RUSAGE_SELF, &r);
	c->ru_user = r.ru_utime.tv_sec + r.ru_utime.tv_usec / 1e6;
	c->ru_sys = r.ru_stime.tv_sec + r.ru_stime.tv_usec / 1e6;
	c->kthr_ticks = kthread_ticks();
	FILE *f = fopen("/proc/stat", "r"); long v[10] = {0};
	if (fscanf(f, "cpu %ld %ld %ld %ld %ld %ld %ld %ld", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5], &v[6], &v[7]) < 7) {}
	fclose(f);
	c->st_user = v[0] + v[1]; c->st_sys = v[2]; c->st_soft = v[5] + v[6];
	c->st_all = v[0] + v[1] + v[2] + v[3] + v[4] + v[5] + v[6] + v[7];
}

/* ---- meminfo etc ---- */
static long meminfo(const char *k)
{
	FILE *f = fopen("/proc/meminfo", "r"); char line[256]; long v = -1; size_t kl = strlen(k);
	while (fgets(line, sizeof(line), f)) if (!strncmp(line, k, kl) && line[kl] == ':') { v = atol(line + kl + 1); break; }
	fclose(f); return v;
}
static long tcp_mem_pages(void)
{
	FILE *f = fopen("/proc/net/sockstat", "r"); char line[256]; long v = -1;
	while (fgets(line, sizeof(line), f)) if (!strncmp(line, "TCP:", 4)) { char *p = strstr(line, " mem "); if (p) v = atol(p + 5); }
	fclose(f); return v;
}
static void slab_line(char *out, size_t outsz)
{
	static const char *names[] = {"skbuff_head_cache", "skbuff_fclone_cache", "skbuff_small_head", "kmalloc-512", "kmalloc-1k", "kmalloc-2k", "kmalloc-4k", "kmalloc-8k", "kmalloc-cg-512", "kmalloc-cg-4k", NULL};
	FILE *f = fopen("/proc/slabinfo", "r"); char line[512], name[64]; long act, num, osz; out[0] = 0;
	while (fgets(line, sizeof(line), f)) {
		if (sscanf(line, "%63s %ld %ld %ld", name, &act, &num, &osz) != 4) continue;
		for (int i = 0; names[i]; i++) if (!strcmp(name, names[i])) {
			size_t l = strlen(out); snprintf(out + l, outsz - l, " %s=%ld", name, act);
		}
	}
	fclose(f);
}
static int qlen(int fd, int req) { int v = -1; if (fd >= 0) ioctl(fd, req, &v); return v; }

/* ---------------- modes ---------------- */
static int run_correct(void)
{
	topo(M_SOCKMAP);
	int ep = epoll_create1(0);
	struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP | EPOLLET};
	ev.data.u32 = 0; epoll_ctl(ep, EPOLL_CTL_ADD, A, &ev);
	ev.data.u32 = 1; epoll_ctl(ep, EPOLL_CTL_ADD, B, &ev);
	struct { uint64_t total; int from_s; } ph[] = {{256ull << 20, 1}, {16ull << 20, 0}};
	int fail = 0;
	for (int p = 0; p < 2; p++) {
		struct xfer tx = {.fd = ph[p].from_s ? S : C, .total = ph[p].total, .pattern = 1};
		struct xfer rx = {.fd = ph[p].from_s ? C : S, .total = ph[p].total, .verify = 1};
		long wake[2] = {0, 0}, waits = 0, samples = 0, pin[2] = {0, 0};
		pthread_t t1, t2; double t0 = now();
		pthread_create(&t2, NULL, recv_thr, &rx); pthread_create(&t1, NULL, send_thr, &tx);
		/* epoll ET counting on A and B (never reading them) */
		while (rx.done < rx.total && now() - t0 < 50) {
			struct epoll_event evs[4]; int n = epoll_wait(ep, evs, 4, 20);
			if (n > 0) waits++;
			for (int i = 0; i < n; i++) {
				wake[evs[i].data.u32]++;
				if (wake[0] + wake[1] <= 6) {
					struct pollfd q = {.fd = evs[i].data.u32 ? B : A, .events = POLLIN};
					poll(&q, 1, 0);
					printf("   wake on %s events=0x%x at sent=%lu recvd=%lu; poll now=0x%x SIOCINQ=%d\n", evs[i].data.u32 ? "B" : "A", evs[i].events,
					       (unsigned long)tx.done, (unsigned long)rx.done, q.revents, qlen(q.fd, SIOCINQ));
				}
			}
			struct pollfd pf[2] = {{.fd = A, .events = POLLIN}, {.fd = B, .events = POLLIN}};
			poll(pf, 2, 0); samples++;
			if (pf[0].revents & POLLIN) pin[0]++;
			if (pf[1].revents & POLLIN) pin[1]++;
		}
		pthread_join(t1, NULL); pthread_join(t2, NULL);
		double dt = now() - t0;
		printf("phase %d: %s->%s %lu bytes sent (%lu send calls), %lu received (%lu recv calls), content %s%s, %.3f s, %.0f MiB/s\n",
		       p + 1, ph[p].from_s ? "S" : "C", ph[p].from_s ? "C" : "S", (unsigned long)tx.done, (unsigned long)tx.calls,
		       (unsigned long)rx.done, (unsigned long)rx.calls, rx.bad ? "CORRUPT at " : "OK (in order, intact)",
		       rx.bad ? "" : "", dt, rx.done / dt / 1048576);
		if (rx.bad) printf("   first mismatch in recv chunk starting at offset %lu\n", (unsigned long)rx.badoff);
		printf("   epoll ET wakeups: A=%ld B=%ld (epoll_wait returns with events=%ld)\n", wake[0], wake[1], waits);
		printf("   poll(timeout 0) samples during transfer: %ld, POLLIN set on A in %ld, on B in %ld\n", samples, pin[0], pin[1]);
		printf("   after: SIOCINQ A=%d B=%d C=%d S=%d\n", qlen(A, SIOCINQ), qlen(B, SIOCINQ), qlen(C, SIOCINQ), qlen(S, SIOCINQ));
		fail |= rx.bad || rx.done != ph[p].total;
	}
	/* concurrent both ways */
	{
		struct xfer t1x = {.fd = S, .total = 64ull << 20, .pattern = 1}, r1x = {.fd = C, .total = 64ull << 20, .verify = 1};
		struct xfer t2x = {.fd = C, .total = 64ull << 20, .pattern = 1}, r2x = {.fd = S, .total = 64ull << 20, .verify = 1};
		pthread_t a, b, c, d;
		pthread_create(&a, NULL, recv_thr, &r1x); pthread_create(&b, NULL, recv_thr, &r2x);
		pthread_create(&c, NULL, send_thr, &t1x); pthread_create(&d, NULL, send_thr, &t2x);
		pthread_join(a, NULL); pthread_join(b, NULL); pthread_join(c, NULL); pthread_join(d, NULL);
		printf("phase 3 (bidirectional 64 MiB each): S->C %lu %s, C->S %lu %s\n", (unsigned long)r1x.done, r1x.bad ? "CORRUPT" : "OK",
		       (unsigned long)r2x.done, r2x.bad ? "CORRUPT" : "OK");
		fail |= r1x.bad || r2x.bad;
	}
	/* FIN wakeups with ET epoll */
	for (int k = 0; k < 2; k++) {
		shutdown(k == 0 ? S : C, SHUT_WR);
		struct epoll_event evs[4]; int n = epoll_wait(ep, evs, 4, 1000);
		printf("after shutdown(%s,SHUT_WR): epoll ET returned %d:", k == 0 ? "S" : "C", n);
		for (int i = 0; i < n; i++) printf(" %s events=0x%x%s%s", evs[i].data.u32 ? "B" : "A", evs[i].events,
		                                   evs[i].events & EPOLLIN ? " IN" : "", evs[i].events & EPOLLRDHUP ? " RDHUP" : "");
		printf("\n");
	}
	return fail;
}

static int run_bench(int m, uint64_t mib)
{
	topo(m);
	struct xfer tx = {.fd = S, .total = mib << 20}, rx = {.fd = C, .total = mib << 20};
	struct cpu c0, c1; pthread_t t1, t2;
	usleep(100000);
	cpu_snap(&c0); double t0 = now();
	pthread_create(&t2, NULL, recv_thr, &rx); pthread_create(&t1, NULL, send_thr, &tx);
	pthread_join(t1, NULL); pthread_join(t2, NULL);
	double dt = now() - t0; cpu_snap(&c1);
	long tk = sysconf(_SC_CLK_TCK);
	printf("BENCH mode=%s bytes=%lu wall=%.3f MiB/s=%.0f proc_user=%.2f proc_sys=%.2f kworker+ksoftirqd=%.2f | machine /proc/stat: sys=%.2f softirq+irq=%.2f user=%.2f (of %.2f cpu-s)\n",
	       mname[m], (unsigned long)rx.done, dt, rx.done / dt / 1048576, c1.ru_user - c0.ru_user, c1.ru_sys - c0.ru_sys,
	       (double)(c1.kthr_ticks - c0.kthr_ticks) / tk, (double)(c1.st_sys - c0.st_sys) / tk, (double)(c1.st_soft - c0.st_soft) / tk,
	       (double)(c1.st_user - c0.st_user) / tk, (double)(c1.st_all - c0.st_all) / tk);
	return rx.done != tx.total;
}

static atomic_int stop_s;
static _Atomic uint64_t s_sent;
static void *stall_sender(void *arg)
{
	(void)arg;
	struct timeval tv = {0, 200000}; setsockopt(S, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
	uint64_t off = 0;
	while (!stop_s && off < (2ull << 30)) {
		size_t n = CH; if (off + n > (2ull << 30)) n = (2ull << 30) - off;
		ssize_t w = send(S, pat + off % PER, n, 0);
		if (w < 0) { if (errno == EAGAIN || errno == EINTR) continue; perror("send"); break; }
		off += w; s_sent = off;
	}
	return NULL;
}
static void stall_print(double t, long base_avail)
{
	char sl[512]; slab_line(sl, sizeof(sl));
	printf("t=%5.2f S_sent=%7.1fMiB C_inq=%d A_outq=%d B_inq=%d S_outq=%d | Slab=%ldkB SUnreclaim=%ldkB MemAvail=%ldMiB(d=%+ldMiB) TCPmem=%ldpg |%s\n",
	       t, s_sent / 1048576.0, qlen(C, SIOCINQ), qlen(A, SIOCOUTQ), qlen(B, SIOCINQ), qlen(S, SIOCOUTQ),
	       meminfo("Slab"), meminfo("SUnreclaim"), meminfo("MemAvailable") / 1024, (meminfo("MemAvailable") - base_avail) / 1024,
	       tcp_mem_pages(), sl);
	fflush(stdout);
}
static int run_stall(int m)
{
	long avail = meminfo("MemAvailable");
	printf("MemAvailable before: %ld MiB\n", avail / 1024);
	if (avail < (3l << 20)) { printf("not enough memory, skip\n"); return 1; }
	topo(m);
	usleep(100000);
	printf("baseline: "); stall_print(0, avail);
	pthread_t t; pthread_create(&t, NULL, stall_sender, NULL);
	double t0 = now(), next = 1, stopped_at = 0;
	const char *why = "10 s elapsed";
	for (;;) {
		usleep(20000);
		double el = now() - t0;
		long av = meminfo("MemAvailable");
		if (av < (1l << 20)) { why = "MemAvailable < 1 GiB"; break; }
		if (s_sent >= (2ull << 30)) { why = "2 GiB sent"; break; }
		if (el >= 10) break;
		if (el >= next) { stall_print(el, avail); next += 1; }
	}
	stop_s = 1; stopped_at = now() - t0;
	pthread_join(t, NULL);
	printf("STOP (%s) at t=%.2f: ", why, stopped_at); stall_print(now() - t0, avail);
	sleep(1);
	printf("1 s later, sender idle, C still not reading: "); stall_print(now() - t0, avail);
	/* now drain C and verify */
	uint64_t total = s_sent, got = 0; int bad = 0; unsigned char *b = malloc(CH);
	struct timeval tv = {2, 0}; setsockopt(C, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	double d0 = now();
	while (got < total && now() - d0 < 25) {
		ssize_t n = recv(C, b, CH, 0);
		if (n <= 0) break;
		if (!bad && verify(b, n, got)) bad = 1;
		got += n;
	}
	printf("drain: C received %lu of %lu bytes sent by S, content %s, %.2f s\n", (unsigned long)got, (unsigned long)total,
	       bad ? "CORRUPT" : "OK", now() - d0);
	printf("after drain: "); stall_print(now() - t0, avail);
	close(C); close(S); if (A >= 0) close(A); if (B >= 0) close(B);
	if (map_fd >= 0) { close(map_fd); close(prog_fd); }
	sleep(1);
	printf("1 s after closing all sockets+map: "); stall_print(now() - t0, avail);
	return 0;
}

static const char *pev(short r, char *buf)
{
	buf[0] = 0;
	if (r & POLLIN)
		strcat(buf, "IN|");
	if (r & POLLRDHUP)
		strcat(buf, "RDHUP|");
	if (r & POLLHUP)
		strcat(buf, "HUP|");
	if (r & POLLOUT)
		strcat(buf, "OUT|");
	if (r & POLLERR)
		strcat(buf, "ERR|");
	if (!buf[0]) strcpy(buf, "none"); else buf[strlen(buf) - 1] = 0;
	return buf;
}

/* EOF: sender X (S or C) sends N then SHUT_WR. Relay watches A and B with poll; on RDHUP/IN with recv()==0 on the
   socket facing the sender it shuts down the other relay socket. The far receiver reads until EOF. */
struct eofrx { int fd; int delay_ms; uint64_t got; int bad; ssize_t last; int lerr; double t_done; double t0; };
static void *eof_rx(void *arg)
{
	struct eofrx *r = arg; unsigned char *b = malloc(CH);
	if (r->delay_ms) usleep(r->delay_ms * 1000);
	struct timeval tv = {3, 0}; setsockopt(r->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	for (;;) {
		r->last = recv(r->fd, b, CH, 0); r->lerr = errno;
		if (r->last <= 0) break;
		if (!r->bad && verify(b, r->last, r->got)) r->bad = 1;
		r->got += r->last;
	}
	r->t_done = now() - r->t0;
	free(b);
	return NULL;
}
static int eof_case(int from_s, uint64_t n, int rx_delay_ms)
{
	topo(M_SOCKMAP);
	int snd = from_s ? S : C, rcv = from_s ? C : S, near = from_s ? B : A, far = from_s ? A : B;
	const char *nn = from_s ? "B" : "A", *fn = from_s ? "A" : "B";
	struct xfer tx = {.fd = snd, .total = n, .pattern = 1, .do_shut = 1};
	pthread_t t1, t2; double t0 = now();
	struct eofrx rx = {.fd = rcv, .delay_ms = rx_delay_ms, .t0 = t0};
	pthread_create(&t2, NULL, eof_rx, &rx);
	pthread_create(&t1, NULL, send_thr, &tx);
	char e1[64], e2[64];
	struct pollfd pf[2] = {{.fd = A, .events = POLLIN | POLLRDHUP}, {.fd = B, .events = POLLIN | POLLRDHUP}};
	int polls = 0, prints = 0, idx = from_s ? 1 : 0;
	long eagain = 0;
	double t_eof = -1;
	while (now() - t0 < 15) {
		int r = poll(pf, 2, 1000); polls++;
		if (r < 0) break;
		if (r == 0) { printf("  t=%.3f poll timeout (1 s), sender sent %lu, receiver got %lu\n", now() - t0, (unsigned long)tx.done, (unsigned long)rx.got); continue; }
		if (prints++ < 12)
			printf("  t=%.3f poll #%d: A revents=%s  B revents=%s  (sender sent %lu)\n", now() - t0, polls, pev(pf[0].revents, e1), pev(pf[1].revents, e2), (unsigned long)tx.done);
		if (pf[idx].revents & (POLLIN | POLLRDHUP | POLLHUP)) {
			char c; ssize_t rr = recv(near, &c, 1, MSG_DONTWAIT); int er = errno;
			if (rr != -1 || er != EAGAIN || eagain == 0)
				printf("  recv(%s,MSG_DONTWAIT) = %zd%s%s; SIOCINQ(%s)=%d\n", nn, rr, rr < 0 ? " errno=" : "", rr < 0 ? strerror(er) : "", nn, qlen(near, SIOCINQ));
			if (rr < 0 && er == EAGAIN) eagain++;
			if (rr == 0) { t_eof = now() - t0; break; }
			if (rr > 0) printf("  !!! relay socket returned a data byte\n");
		}
		pf[1 - idx].events = 0; /* only watch the socket facing the sender after the first report */
		if (!(pf[idx].revents & (POLLRDHUP | POLLHUP))) usleep(1000);
	}
	printf("  polls=%d, recv EAGAIN count=%ld\n", polls, eagain);
	if (t_eof >= 0) {
		printf("  EOF (recv==0) on %s at t=%.3f; sender sent %lu; receiver had %lu; SIOCOUTQ(%s)=%d; relay calls shutdown(%s, SHUT_WR)\n",
		       nn, t_eof, (unsigned long)tx.done, (unsigned long)rx.got, fn, qlen(far, SIOCOUTQ), fn);
		shutdown(far, SHUT_WR);
	} else printf("  relay never saw recv()==0 on %s\n", nn);
	pthread_join(t1, NULL); pthread_join(t2, NULL);
	printf("  RESULT from=%s N=%lu rx_delay=%dms: receiver %s got %lu bytes (%s), then recv=%zd%s%s at t=%.3f\n", from_s ? "S" : "C",
	       (unsigned long)n, rx_delay_ms, from_s ? "C" : "S", (unsigned long)rx.got, rx.bad ? "CORRUPT" : "content OK",
	       rx.last, rx.last < 0 ? " errno=" : " (EOF)", rx.last < 0 ? strerror(rx.lerr) : "", rx.t_done);
	close(A); close(B); close(C); close(S); close(map_fd); close(prog_fd);
	return rx.got != n;
}
static int run_eof(void)
{
	struct { int from_s; uint64_t n; int delay; } cs[] = {
		{1, 1 << 20, 0}, {1, 64ull << 20, 0}, {1, 64ull << 20, 500}, {0, 1 << 20, 0}, {0, 64ull << 20, 0},
	};
	int fail = 0;
	for (unsigned i = 0; i < sizeof(cs) / sizeof(cs[0]); i++) {
		printf("EOF case %u: %s sends %lu then SHUT_WR; receiver starts reading %d ms after relay shutdown\n", i + 1,
		       cs[i].from_s ? "S" : "C", (unsigned long)cs[i].n, cs[i].delay);
		fail |= eof_case(cs[i].from_s, cs[i].n, cs[i].delay);
	}
	return fail;
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	pat_init();
	if (argc < 2) goto usage;
	int m = -1;
	if (argc > 2) for (int i = 0; i < 3; i++) if (!strcmp(argv[2], mname[i])) m = i;
	if (!strcmp(argv[1], "correct")) return run_correct();
	if (!strcmp(argv[1], "bench") && m >= 0 && argc > 3) return run_bench(m, atoll(argv[3]));
	if (!strcmp(argv[1], "stall") && m >= 0) return run_stall(m);
	if (!strcmp(argv[1], "eof")) return run_eof();
usage:
	fprintf(stderr, "usage: skm correct | bench <direct|sockmap|splice> <MiB> | stall <direct|sockmap|splice> | eof\n");
	return 1;
}
