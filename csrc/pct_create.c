/* SPDX-License-Identifier: Apache-2.0 */
/* Bulk creation of entries (tests, demo, benchmarks): CT_NEW requests built
 * with libnetfilter_conntrack, sent in batches. */
#include <arpa/inet.h>
#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <linux/netfilter/nfnetlink.h>
#include <linux/netfilter/nfnetlink_conntrack.h>
#include <libnetfilter_conntrack/libnetfilter_conntrack.h>
#include <libnetfilter_conntrack/libnetfilter_conntrack_tcp.h>

#include "pct.h"

#define ICMP_ECHO_REQUEST   8
#define ICMPV6_ECHO_REQUEST 128
#define TCP_ESTABLISHED_STATE 3

static int is_zero(const unsigned char *a, int len)
{
    int i;

    for (i = 0; i < len; i++)
        if (a[i])
            return 0;
    return 1;
}

/* addr + k, treating the last four bytes as a big-endian counter */
static void add_to_addr(unsigned char *out, const unsigned char *base, int len,
                        unsigned int k)
{
    unsigned int v;

    memcpy(out, base, len);
    memcpy(&v, out + len - 4, 4);
    v = htonl(ntohl(v) + k);
    memcpy(out + len - 4, &v, 4);
}

static void set_entry(struct nf_conntrack *ct, const struct pct_create_spec *s,
                      unsigned int i)
{
    unsigned int nports = 65536u - s->sport_base;
    unsigned short sport = (unsigned short)(s->sport_base + i % nports);
    int v6 = s->family == AF_INET6, alen = v6 ? 16 : 4;
    unsigned char src[16];

    add_to_addr(src, s->src, alen, i / nports);
    nfct_set_attr_u8(ct, ATTR_L3PROTO, s->family);
    nfct_set_attr_u8(ct, ATTR_L4PROTO, s->proto);
    if (v6) {
        nfct_set_attr(ct, ATTR_IPV6_SRC, src);
        nfct_set_attr(ct, ATTR_IPV6_DST, s->dst);
    } else {
        nfct_set_attr(ct, ATTR_IPV4_SRC, src);
        nfct_set_attr(ct, ATTR_IPV4_DST, s->dst);
    }
    if (s->proto == IPPROTO_ICMP || s->proto == IPPROTO_ICMPV6) {
        nfct_set_attr_u8(ct, ATTR_ICMP_TYPE,
                         s->proto == IPPROTO_ICMP ? ICMP_ECHO_REQUEST : ICMPV6_ECHO_REQUEST);
        nfct_set_attr_u8(ct, ATTR_ICMP_CODE, 0);
        nfct_set_attr_u16(ct, ATTR_ICMP_ID, htons(sport));
    } else {
        nfct_set_attr_u16(ct, ATTR_PORT_SRC, htons(sport));
        nfct_set_attr_u16(ct, ATTR_PORT_DST, htons(s->dport));
    }
    nfct_setobjopt(ct, NFCT_SOPT_SETUP_REPLY);
    /* a NAT'd entry: the reply comes from / goes to other addresses */
    if (!is_zero(s->reply_src, alen))
        nfct_set_attr(ct, v6 ? ATTR_REPL_IPV6_SRC : ATTR_REPL_IPV4_SRC, s->reply_src);
    if (!is_zero(s->reply_dst, alen))
        nfct_set_attr(ct, v6 ? ATTR_REPL_IPV6_DST : ATTR_REPL_IPV4_DST, s->reply_dst);
    if (s->proto == IPPROTO_TCP)
        nfct_set_attr_u8(ct, ATTR_TCP_STATE, TCP_ESTABLISHED_STATE);
    nfct_set_attr_u32(ct, ATTR_TIMEOUT, s->timeout);
    if (s->mark)
        nfct_set_attr_u32(ct, ATTR_MARK, s->mark);
    /* a zone for one direction goes inside that direction's tuple */
    if (s->use_zone && s->zone_dir == PCT_ZONE_ORIG)
        nfct_set_attr_u16(ct, ATTR_ORIG_ZONE, s->zone);
    else if (s->use_zone && s->zone_dir == PCT_ZONE_REPLY)
        nfct_set_attr_u16(ct, ATTR_REPL_ZONE, s->zone);
    else if (s->use_zone)
        nfct_set_attr_u16(ct, ATTR_ZONE, s->zone);
}

long long pct_create(struct pct_handle *h, const struct pct_create_spec *spec,
                     unsigned long long *failed, int *first_errno)
{
    struct pct_ack_counts acks = {0};
    struct nf_conntrack *ct;
    unsigned int i;
    int err = 0;

    *failed = 0;
    *first_errno = 0;
    if (spec->family != AF_INET && spec->family != AF_INET6)
        return -EAFNOSUPPORT;
    if (spec->sport_base == 0)
        return -EINVAL;
    ct = nfct_new();
    if (!ct)
        return -ENOMEM;
    for (i = spec->first; i - spec->first < spec->count; i++) {
        struct nlmsghdr *nlh;
        char *slot = pct_batch_slot(h, 512, &acks, &err);

        if (!slot)
            break;
        nlh = pct_put_request(slot, IPCTNL_MSG_CT_NEW,
                              NLM_F_CREATE | NLM_F_EXCL,
                              spec->family, 0, ++h->seq);
        set_entry(ct, spec, i);
        if (nfct_nlmsg_build(nlh, ct) < 0) {
            err = -errno ? -errno : -EINVAL;
            break;
        }
        pct_batch_commit(h, nlh);
    }
    nfct_destroy(ct);
    if (!err)
        err = pct_batch_flush(h, &acks);
    else
        pct_batch_flush(h, &acks);
    *failed = acks.failed + acks.enoent;
    *first_errno = acks.first_errno ? acks.first_errno : (acks.enoent ? ENOENT : 0);
    if (err)
        return err;
    return (long long)acks.ok;
}
