// SPDX-License-Identifier: Apache-2.0
/*
 * flowgen: open N new conntrack flows by sending one packet per flow.
 *
 *   flowgen --proto tcp|udp|icmp --family 4|6 --dst ADDR[,ADDR...] --flows N
 *           [--src ADDR] [--rate R] [--duration S] [--sport-base P] [--dport P]
 *           [--ports K] [--batch B] [--threads T]
 *
 * Flow i uses port/id slot j = i % K and destination address
 * dst[(i / K) % ndst], so the first K flows go to the first address, the next
 * K to the second, and so on; every packet is a distinct 5-tuple as long as
 * N <= K * ndst (checked at start-up).
 *
 *   udp   one unconnected UDP socket (bound to --src / --sport-base when
 *         given), sendmmsg; the destination port varies: --dport + j
 *         (--dport default 1024).
 *   tcp   raw socket, one SYN per flow; the source port varies:
 *         --sport-base + j (default 1024), destination port --dport (default 80).
 *         IPv4: IPPROTO_RAW (header included), TCP checksum computed here with
 *         the pseudo-header. IPv6: SOCK_RAW/IPPROTO_TCP with IPV6_CHECKSUM 16
 *         (the kernel computes it).
 *   icmp  raw ICMP / ICMPv6 socket, echo requests, the echo id varies:
 *         (--sport-base + j) mod 65536 (default base 1). ICMPv4 checksum
 *         computed here, ICMPv6 by the kernel.
 * --ports K defaults to min(60000, 65536 - base). --reuse lets N exceed K x ndst:
 * flow indexes wrap around, so packets after the first K x ndst belong to
 * established flows (the same tuples again).
 *
 * Sends in batches of --batch (default 256, at most 1024) with sendmmsg, as
 * fast as possible or paced at --rate packets/s (in total); stops after N
 * packets, after --duration seconds, or on SIGINT/SIGTERM. --threads T
 * (default 1) splits the flow indexes into T contiguous ranges, one thread and
 * one socket each (the receiving stack then runs on T CPUs as well). Prints one JSON line:
 *   {"sent": N, "seconds": S, "rate": R, "errors": E}
 * Exit status: 0 all sent, 1 some packets could not be sent (JSON printed,
 * first error on stderr), 2 usage or setup error (one line on stderr).
 *
 * Only libc. Raw sockets need CAP_NET_RAW. Run it inside a scratch netns.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <linux/filter.h>
#include <netinet/icmp6.h>
#include <netinet/in.h>
#include <netinet/ip.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_BATCH 1024
#define MAX_DST 65536
#define PKT_MAX 64
#define MAX_THREADS 64

enum proto { P_TCP, P_UDP, P_ICMP };

struct tcphdr_raw {             /* RFC 793 header without options, 20 bytes */
	uint16_t sport, dport;
	uint32_t seq, ack;
	uint8_t doff_res;       /* data offset << 4 */
	uint8_t flags;
	uint16_t window, check, urg;
} __attribute__((packed));

struct icmp_echo {              /* ICMP / ICMPv6 echo request, 8 bytes */
	uint8_t type, code;
	uint16_t check, id, seq;
} __attribute__((packed));

union addr {
	struct in_addr v4;
	struct in6_addr v6;
};

static volatile sig_atomic_t stop_flag;

/* the run's configuration, set in main before the workers start */
static struct {
	enum proto proto;
	int family, v6, have_src;
	union addr src;
	const char *src_arg;
	union addr *dst, *srcs;         /* srcs: IPv4 TCP, per destination */
	long ndst, flows, sport_base, dport, ports, batch, base;
	double rate, t0, deadline;
	int nthreads;
	int reuse;                      /* --reuse: flow indexes wrap around the tuples */
} cfg;

struct worker {
	pthread_t tid;
	int fd;
	long lo, hi;                    /* flow indexes [lo, hi) */
	long sent, errors;
	int first_errno;
	uint8_t pkts[MAX_BATCH][PKT_MAX];
	struct sockaddr_in6 names[MAX_BATCH];   /* large enough for either family */
	struct iovec iov[MAX_BATCH];
	struct mmsghdr msgs[MAX_BATCH];
};

static void on_signal(int sig)
{
	(void)sig;
	stop_flag = 1;
}

static void __attribute__((noreturn, format(printf, 1, 2))) die(const char *fmt, ...)
{
	va_list ap;
	fputs("flowgen: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	exit(2);
}

static const char usage[] =
	"usage: flowgen --proto tcp|udp|icmp --family 4|6 --dst ADDR[,ADDR...] --flows N\n"
	"               [--src ADDR] [--rate R] [--duration S] [--sport-base P] [--dport P]\n"
	"               [--ports K] [--batch B] [--threads T] [--reuse]";

static long parse_long(const char *opt, const char *s, long lo, long hi)
{
	char *end;
	errno = 0;
	long v = strtol(s, &end, 10);
	if (errno || end == s || *end || v < lo || v > hi)
		die("--%s: expected an integer in %ld..%ld, got '%s'", opt, lo, hi, s);
	return v;
}

static double parse_double(const char *opt, const char *s)
{
	char *end;
	errno = 0;
	double v = strtod(s, &end);
	if (errno || end == s || *end || !(v >= 0) || v > 1e12)
		die("--%s: expected a non-negative number, got '%s'", opt, s);
	return v;
}

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* one's complement sum, folded later */
static uint32_t csum_add(uint32_t sum, const void *data, size_t len)
{
	const uint8_t *p = data;
	while (len > 1) {
		sum += (uint32_t)p[0] << 8 | p[1];
		p += 2;
		len -= 2;
	}
	if (len)
		sum += (uint32_t)p[0] << 8;
	return sum;
}

static uint16_t csum_fold(uint32_t sum)
{
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return htons((uint16_t)~sum);
}

/* the source address the kernel would pick for dst (route lookup, no packet sent) */
static void route_src(int family, const union addr *dst, union addr *src)
{
	int fd = socket(family, SOCK_DGRAM, 0);
	if (fd < 0)
		die("socket: %s", strerror(errno));
	struct sockaddr_storage ss = {0};
	socklen_t len;
	if (family == AF_INET) {
		struct sockaddr_in *s = (struct sockaddr_in *)&ss;
		s->sin_family = AF_INET;
		s->sin_port = htons(9);
		s->sin_addr = dst->v4;
		len = sizeof(*s);
	} else {
		struct sockaddr_in6 *s = (struct sockaddr_in6 *)&ss;
		s->sin6_family = AF_INET6;
		s->sin6_port = htons(9);
		s->sin6_addr = dst->v6;
		len = sizeof(*s);
	}
	char buf[INET6_ADDRSTRLEN];
	if (connect(fd, (struct sockaddr *)&ss, len) < 0)
		die("no route to %s: %s", inet_ntop(family, dst, buf, sizeof(buf)), strerror(errno));
	len = sizeof(ss);
	if (getsockname(fd, (struct sockaddr *)&ss, &len) < 0)
		die("getsockname: %s", strerror(errno));
	if (family == AF_INET)
		src->v4 = ((struct sockaddr_in *)&ss)->sin_addr;
	else
		src->v6 = ((struct sockaddr_in6 *)&ss)->sin6_addr;
	close(fd);
}

static void drop_all_input(int fd)
{
	/* nothing is ever read: a socket filter that accepts no packet keeps
	 * raw sockets from queueing copies of incoming traffic */
	struct sock_filter code[] = {{BPF_RET | BPF_K, 0, 0, 0}};
	struct sock_fprog prog = {.len = 1, .filter = code};
	(void)setsockopt(fd, SOL_SOCKET, SO_ATTACH_FILTER, &prog, sizeof(prog));
}

static int open_socket(void)
{
	int fd, v6 = cfg.v6;
	enum proto proto = cfg.proto;
	if (proto == P_UDP)
		fd = socket(cfg.family, SOCK_DGRAM, 0);
	else if (proto == P_TCP)
		fd = v6 ? socket(AF_INET6, SOCK_RAW, IPPROTO_TCP) : socket(AF_INET, SOCK_RAW, IPPROTO_RAW);
	else
		fd = v6 ? socket(AF_INET6, SOCK_RAW, IPPROTO_ICMPV6) : socket(AF_INET, SOCK_RAW, IPPROTO_ICMP);
	if (fd < 0)
		die("socket: %s%s", strerror(errno),
		    errno == EPERM ? " (raw sockets need CAP_NET_RAW)" : "");
	int one = 1, sndbuf = 4 << 20;
	(void)setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof(sndbuf));
	if (proto != P_UDP)
		drop_all_input(fd);
	if (v6 && proto == P_TCP) {
		int off = 16;   /* offsetof(tcphdr, check): the kernel computes the checksum */
		if (setsockopt(fd, IPPROTO_IPV6, IPV6_CHECKSUM, &off, sizeof(off)) < 0)
			die("IPV6_CHECKSUM: %s", strerror(errno));
	}
	if (v6 && proto == P_ICMP) {
		struct icmp6_filter f;
		ICMP6_FILTER_SETBLOCKALL(&f);
		(void)setsockopt(fd, IPPROTO_ICMPV6, ICMP6_FILTER, &f, sizeof(f));
	}
	if (!v6 && proto == P_TCP && setsockopt(fd, IPPROTO_IP, IP_HDRINCL, &one, sizeof(one)) < 0)
		die("IP_HDRINCL: %s", strerror(errno));

	/* bind: the source address (all but IPv4 TCP, whose header is ours) and,
	 * for UDP, the source port (shared by the threads' sockets) */
	int bind_port = proto == P_UDP && cfg.sport_base > 0;
	if ((cfg.have_src && !(proto == P_TCP && !v6)) || bind_port) {
		struct sockaddr_storage ss = {0};
		socklen_t len;
		uint16_t port = bind_port ? htons((uint16_t)cfg.sport_base) : 0;
		if (!v6) {
			struct sockaddr_in *s = (struct sockaddr_in *)&ss;
			s->sin_family = AF_INET;
			s->sin_addr = cfg.have_src ? cfg.src.v4 : (struct in_addr){htonl(INADDR_ANY)};
			s->sin_port = port;
			len = sizeof(*s);
		} else {
			struct sockaddr_in6 *s = (struct sockaddr_in6 *)&ss;
			s->sin6_family = AF_INET6;
			s->sin6_addr = cfg.have_src ? cfg.src.v6 : in6addr_any;
			s->sin6_port = port;
			len = sizeof(*s);
		}
		if (bind_port && cfg.nthreads > 1)
			(void)setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one));
		if (bind(fd, (struct sockaddr *)&ss, len) < 0)
			die("bind %s%s%ld: %s", cfg.src_arg ? cfg.src_arg : "*", bind_port ? " port " : "",
			    bind_port ? cfg.sport_base : 0L, strerror(errno));
	}
	return fd;
}

/* fill slot k of w's batch with the packet of flow i */
static void build(struct worker *w, int k, long i)
{
	static const uint8_t udp_payload[8] = "flowgen";
	const int v6 = cfg.v6;
	long j = i % cfg.ports;
	long a = (i / cfg.ports) % cfg.ndst;
	uint16_t slot = (uint16_t)((cfg.base + j) & 0xffff);
	uint8_t *pkt = w->pkts[k];
	struct mmsghdr *m = &w->msgs[k];
	size_t len = 0;

	memset(&w->names[k], 0, sizeof(w->names[k]));
	if (!v6) {
		struct sockaddr_in *s = (struct sockaddr_in *)&w->names[k];
		s->sin_family = AF_INET;
		s->sin_addr = cfg.dst[a].v4;
		if (cfg.proto == P_UDP)
			s->sin_port = htons(slot);
		m->msg_hdr.msg_namelen = sizeof(*s);
	} else {
		w->names[k].sin6_family = AF_INET6;
		w->names[k].sin6_addr = cfg.dst[a].v6;
		if (cfg.proto == P_UDP)
			w->names[k].sin6_port = htons(slot);
		m->msg_hdr.msg_namelen = sizeof(w->names[k]);
	}
	if (cfg.proto == P_UDP) {
		w->iov[k].iov_base = (void *)udp_payload;
		w->iov[k].iov_len = sizeof(udp_payload);
	} else if (cfg.proto == P_TCP) {
		struct tcphdr_raw *th;
		if (!v6) {
			struct iphdr *ip = (struct iphdr *)pkt;
			memset(ip, 0, sizeof(*ip));
			ip->version = 4;
			ip->ihl = 5;
			ip->ttl = 64;
			ip->protocol = IPPROTO_TCP;
			ip->tot_len = htons(sizeof(*ip) + sizeof(*th));
			ip->id = htons((uint16_t)i);
			ip->saddr = cfg.srcs[a].v4.s_addr;
			ip->daddr = cfg.dst[a].v4.s_addr;
			th = (struct tcphdr_raw *)(pkt + sizeof(*ip));
			len = sizeof(*ip);
		} else {
			th = (struct tcphdr_raw *)pkt;
		}
		memset(th, 0, sizeof(*th));
		th->sport = htons(slot);
		th->dport = htons((uint16_t)cfg.dport);
		th->seq = htonl((uint32_t)(i * 2654435761u + 1));
		th->doff_res = 5 << 4;
		th->flags = 0x02;   /* SYN */
		th->window = htons(64240);
		if (!v6) {      /* pseudo-header: saddr, daddr, zero, protocol, TCP length */
			struct { uint32_t s, d; uint8_t z, p; uint16_t l; } __attribute__((packed)) ph = {
				cfg.srcs[a].v4.s_addr, cfg.dst[a].v4.s_addr, 0, IPPROTO_TCP,
				htons(sizeof(*th))};
			th->check = csum_fold(csum_add(csum_add(0, &ph, sizeof(ph)), th, sizeof(*th)));
		}
		len += sizeof(*th);
		w->iov[k].iov_base = pkt;
		w->iov[k].iov_len = len;
	} else {
		struct icmp_echo *e = (struct icmp_echo *)pkt;
		e->type = v6 ? ICMP6_ECHO_REQUEST : 8;
		e->code = 0;
		e->check = 0;
		e->id = htons(slot);
		e->seq = htons((uint16_t)(i / cfg.ports + 1));
		if (!v6)
			e->check = csum_fold(csum_add(0, e, sizeof(*e)));
		w->iov[k].iov_base = pkt;
		w->iov[k].iov_len = sizeof(*e);
	}
	m->msg_hdr.msg_name = &w->names[k];
	m->msg_hdr.msg_iov = &w->iov[k];
	m->msg_hdr.msg_iovlen = 1;
	m->msg_hdr.msg_control = NULL;
	m->msg_hdr.msg_controllen = 0;
	m->msg_hdr.msg_flags = 0;
}

static void *run(void *arg)
{
	struct worker *w = arg;
	double rate = cfg.rate > 0 ? cfg.rate / cfg.nthreads : 0;
	long batch = cfg.batch;
	if (rate > 0) {         /* pace in batches of about 1 ms */
		long b = (long)(rate / 1000);
		if (b < 1) b = 1;
		if (b < batch) batch = b;
	}
	long next = w->lo;      /* the flow index of the next packet to build */
	while (next < w->hi && !stop_flag) {
		double t = now_s();
		if (cfg.deadline && t >= cfg.deadline)
			break;
		if (rate > 0) {
			double due = cfg.t0 + (next - w->lo) / rate;
			if (due > t) {
				double d = due - t;
				struct timespec ts = {(time_t)d, (long)((d - (time_t)d) * 1e9)};
				nanosleep(&ts, NULL);
				continue;
			}
		}
		int n = (int)(w->hi - next < batch ? w->hi - next : batch);
		for (int k = 0; k < n; k++)
			build(w, k, next + k);
		int off = 0, retries = 0;
		while (off < n) {
			int r = sendmmsg(w->fd, w->msgs + off, n - off, 0);
			if (r > 0) {
				off += r;
				w->sent += r;
				retries = 0;
				continue;
			}
			if (r < 0 && errno == EINTR && !stop_flag)
				continue;
			if (r < 0 && (errno == ENOBUFS || errno == EAGAIN) && retries < 1000) {
				struct timespec ts = {0, 50000};   /* the queue drains: retry */
				nanosleep(&ts, NULL);
				retries++;
				continue;
			}
			if (!w->first_errno)
				w->first_errno = r < 0 ? errno : EIO;
			w->errors++;    /* this packet is lost: go on with the next */
			off++;
			retries = 0;
			if (stop_flag)
				break;
		}
		next += n;
	}
	return NULL;
}

int main(int argc, char **argv)
{
	int have_proto = 0;
	char *dst_arg = NULL;
	double duration = 0;

	cfg.proto = P_UDP;
	cfg.flows = -1;
	cfg.sport_base = -1;
	cfg.dport = -1;
	cfg.ports = -1;
	cfg.batch = 256;
	cfg.nthreads = 1;

	static const struct option opts[] = {
		{"proto", required_argument, 0, 'p'},
		{"family", required_argument, 0, 'f'},
		{"dst", required_argument, 0, 'd'},
		{"src", required_argument, 0, 's'},
		{"flows", required_argument, 0, 'n'},
		{"rate", required_argument, 0, 'r'},
		{"duration", required_argument, 0, 't'},
		{"sport-base", required_argument, 0, 'S'},
		{"dport", required_argument, 0, 'D'},
		{"ports", required_argument, 0, 'K'},
		{"batch", required_argument, 0, 'b'},
		{"threads", required_argument, 0, 'T'},
		{"reuse", no_argument, 0, 'U'},
		{"help", no_argument, 0, 'h'},
		{0, 0, 0, 0},
	};
	int c;
	opterr = 0;
	while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		switch (c) {
		case 'p':
			if (!strcmp(optarg, "tcp")) cfg.proto = P_TCP;
			else if (!strcmp(optarg, "udp")) cfg.proto = P_UDP;
			else if (!strcmp(optarg, "icmp") || !strcmp(optarg, "icmpv6")) cfg.proto = P_ICMP;
			else die("--proto: expected tcp, udp or icmp, got '%s'", optarg);
			have_proto = 1;
			break;
		case 'f':
			if (!strcmp(optarg, "4") || !strcmp(optarg, "ipv4")) cfg.family = AF_INET;
			else if (!strcmp(optarg, "6") || !strcmp(optarg, "ipv6")) cfg.family = AF_INET6;
			else die("--family: expected 4 or 6, got '%s'", optarg);
			break;
		case 'd': dst_arg = optarg; break;
		case 's': cfg.src_arg = optarg; break;
		case 'n': cfg.flows = parse_long("flows", optarg, 0, 1L << 40); break;
		case 'r': cfg.rate = parse_double("rate", optarg); break;
		case 't': duration = parse_double("duration", optarg); break;
		case 'S': cfg.sport_base = parse_long("sport-base", optarg, 1, 65535); break;
		case 'D': cfg.dport = parse_long("dport", optarg, 1, 65535); break;
		case 'K': cfg.ports = parse_long("ports", optarg, 1, 65536); break;
		case 'b': cfg.batch = parse_long("batch", optarg, 1, MAX_BATCH); break;
		case 'T': cfg.nthreads = (int)parse_long("threads", optarg, 1, MAX_THREADS); break;
		case 'U': cfg.reuse = 1; break;
		case 'h': puts(usage); return 0;
		default:
			die("unknown or incomplete option '%s' (--help for usage)", argv[optind - 1]);
		}
	}
	if (optind < argc)
		die("unexpected argument '%s'", argv[optind]);
	if (!have_proto || !cfg.family || !dst_arg || cfg.flows < 0)
		die("--proto, --family, --dst and --flows are required (--help for usage)");
	cfg.v6 = cfg.family == AF_INET6;
	const int fam_n = cfg.v6 ? 6 : 4;

	/* destinations */
	cfg.dst = calloc(MAX_DST, sizeof(*cfg.dst));
	if (!cfg.dst)
		die("out of memory");
	for (char *save = NULL, *tok = strtok_r(dst_arg, ",", &save); tok;
	     tok = strtok_r(NULL, ",", &save)) {
		if (cfg.ndst == MAX_DST)
			die("--dst: more than %d addresses", MAX_DST);
		if (inet_pton(cfg.family, tok, &cfg.dst[cfg.ndst]) != 1)
			die("--dst: '%s' is not an IPv%d address", tok, fam_n);
		cfg.ndst++;
	}
	if (!cfg.ndst)
		die("--dst: no address given");
	if (cfg.src_arg) {
		if (inet_pton(cfg.family, cfg.src_arg, &cfg.src) != 1)
			die("--src: '%s' is not an IPv%d address", cfg.src_arg, fam_n);
		cfg.have_src = 1;
	}

	/* the varied field: dport (udp), sport (tcp) or the echo id (icmp) */
	if (cfg.proto == P_UDP) {
		cfg.base = cfg.dport > 0 ? cfg.dport : 1024;
	} else if (cfg.proto == P_TCP) {
		cfg.base = cfg.sport_base > 0 ? cfg.sport_base : 1024;
		if (cfg.dport < 0)
			cfg.dport = 80;
	} else {
		cfg.base = cfg.sport_base > 0 ? cfg.sport_base : 1;   /* ids wrap modulo 65536 */
	}
	if (cfg.ports < 0)
		cfg.ports = cfg.proto == P_ICMP || 65536 - cfg.base > 60000 ? 60000 : 65536 - cfg.base;
	if (cfg.proto != P_ICMP && cfg.base + cfg.ports - 1 > 65535)
		die("%s %ld + --ports %ld exceeds port 65535",
		    cfg.proto == P_UDP ? "--dport" : "--sport-base", cfg.base, cfg.ports);
	if (!cfg.reuse && (double)cfg.flows > (double)cfg.ports * (double)cfg.ndst)
		die("--flows %ld exceeds the %ld distinct tuples (--ports %ld x %ld addresses): "
		    "give more --dst addresses", cfg.flows, cfg.ports * cfg.ndst, cfg.ports, cfg.ndst);

	/* IPv4 TCP builds the IP header: a source address per destination */
	if (cfg.proto == P_TCP && !cfg.v6) {
		cfg.srcs = calloc(cfg.ndst, sizeof(*cfg.srcs));
		if (!cfg.srcs)
			die("out of memory");
		for (long k = 0; k < cfg.ndst; k++) {
			if (cfg.have_src)
				cfg.srcs[k] = cfg.src;
			else
				route_src(AF_INET, &cfg.dst[k], &cfg.srcs[k]);
		}
	}

	int nt = cfg.nthreads;
	struct worker *w = calloc(nt, sizeof(*w));
	if (!w)
		die("out of memory");
	for (int t = 0; t < nt; t++) {      /* all sockets ready before the clock starts */
		w[t].fd = open_socket();
		w[t].lo = cfg.flows * t / nt;
		w[t].hi = cfg.flows * (t + 1) / nt;
	}

	struct sigaction sa = {0};
	sa.sa_handler = on_signal;
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);

	cfg.t0 = now_s();
	cfg.deadline = duration > 0 ? cfg.t0 + duration : 0;
	if (nt == 1) {
		run(&w[0]);
	} else {
		for (int t = 0; t < nt; t++) {
			int e = pthread_create(&w[t].tid, NULL, run, &w[t]);
			if (e) {        /* stop the started ones, report what they sent */
				stop_flag = 1;
				fprintf(stderr, "flowgen: pthread_create: %s\n", strerror(e));
				nt = t;
				break;
			}
		}
		for (int t = 0; t < nt; t++)
			pthread_join(w[t].tid, NULL);
	}
	double secs = now_s() - cfg.t0;
	long sent = 0, errors = 0;
	int first_errno = 0;
	for (int t = 0; t < cfg.nthreads; t++) {
		sent += w[t].sent;
		errors += w[t].errors;
		if (!first_errno)
			first_errno = w[t].first_errno;
	}
	printf("{\"sent\": %ld, \"seconds\": %.6f, \"rate\": %.1f, \"errors\": %ld}\n",
	       sent, secs, secs > 0 ? sent / secs : 0.0, errors);
	fflush(stdout);
	if (errors) {
		fprintf(stderr, "flowgen: %ld packets not sent (first error: %s)\n", errors,
			strerror(first_errno));
		return 1;
	}
	return nt == cfg.nthreads ? 0 : 2;
}
