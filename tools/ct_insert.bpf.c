// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* A creator the netfilter hooks never see: conntrack entries inserted by
 * an XDP program through the conntrack kfuncs (bpf_xdp_ct_alloc +
 * bpf_ct_insert_entry), the way an XDP or tc datapath does it. The index
 * tests run it with BPF_PROG_TEST_RUN (bpftool prog run) inside a scratch
 * network namespace: the kfuncs insert into the caller's namespace.
 *
 * The "packet" is a request, and the program writes its answer over it. */
#include "../bpf/vmlinux.h"
#include <bpf/bpf_helpers.h>

#define MAX_INSERTS 64

struct insert_request {
	__be32 saddr, daddr;	/* UDP, original direction */
	__be16 sport, dport;	/* entry i uses sport + i (host order added) */
	__u16 zone;
	__u8 zone_dir;		/* 0: both directions; 1: original; 2: reply */
	__u8 count;		/* <= MAX_INSERTS */
	__s32 inserted;		/* out: entries inserted */
	__s32 error;		/* out: first error (negative errno), 0 if none */
	__u8 pad[8];		/* a test run needs at least an Ethernet header */
};

extern struct nf_conn___init *bpf_xdp_ct_alloc(struct xdp_md *ctx, struct bpf_sock_tuple *tuple,
					       __u32 tuple__sz, struct bpf_ct_opts *opts,
					       __u32 opts__sz) __ksym;
extern struct nf_conn *bpf_ct_insert_entry(struct nf_conn___init *nfct_i) __ksym;
extern void bpf_ct_set_timeout(struct nf_conn___init *nfct, __u32 timeout) __ksym;
extern void bpf_ct_release(struct nf_conn *ct) __ksym;

SEC("xdp")
int ct_insert(struct xdp_md *ctx)
{
	struct insert_request *req = (void *)(long)ctx->data;
	struct bpf_ct_opts opts = {};
	struct bpf_sock_tuple tuple = {};
	struct nf_conn___init *fresh;
	struct nf_conn *ct;
	__u16 sport;
	int i;

	if ((void *)(req + 1) > (void *)(long)ctx->data_end)
		return XDP_ABORTED;
	req->inserted = 0;
	req->error = 0;
	sport = __builtin_bswap16(req->sport);
	for (i = 0; i < MAX_INSERTS; i++) {
		if (i >= req->count)
			break;
		tuple.ipv4.saddr = req->saddr;
		tuple.ipv4.daddr = req->daddr;
		tuple.ipv4.sport = __builtin_bswap16((__u16)(sport + i));
		tuple.ipv4.dport = req->dport;
		opts.netns_id = -1;	/* BPF_F_CURRENT_NETNS */
		opts.l4proto = IPPROTO_UDP;
		opts.ct_zone_id = req->zone;
		opts.ct_zone_dir = req->zone_dir;
		fresh = bpf_xdp_ct_alloc(ctx, &tuple, sizeof(tuple.ipv4), &opts, sizeof(opts));
		if (!fresh) {
			req->error = opts.error;
			break;
		}
		bpf_ct_set_timeout(fresh, 300000);	/* ms: outlives the test */
		ct = bpf_ct_insert_entry(fresh);
		if (!ct) {
			req->error = -17;	/* EEXIST: the tuple is taken */
			break;
		}
		bpf_ct_release(ct);
		req->inserted++;
	}
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
