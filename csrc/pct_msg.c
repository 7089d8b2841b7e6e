/* SPDX-License-Identifier: Apache-2.0 */
/* Building and parsing ctnetlink messages with libmnl. */
#include <arpa/inet.h>
#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <linux/netfilter/nfnetlink.h>
#include <linux/netfilter/nfnetlink_conntrack.h>

#include "pct.h"

/* CTA_FILTER flag bits: kernel-internal (nf_internals.h), not uapi. */
#define CTA_FILTER_F_IP_SRC    (1 << 0)
#define CTA_FILTER_F_IP_DST    (1 << 1)
#define CTA_FILTER_F_PROTO_NUM (1 << 3)
#define CTA_FILTER_F_SPORT     (1 << 4)
#define CTA_FILTER_F_DPORT     (1 << 5)

int pct_addr_len(unsigned char family)
{
    return family == AF_INET6 ? 16 : 4;
}

struct nlmsghdr *pct_put_request(char *buf, unsigned int type, unsigned int flags,
                                 unsigned char family, unsigned char version,
                                 unsigned int seq)
{
    struct nlmsghdr *nlh = mnl_nlmsg_put_header(buf);
    struct nfgenmsg *nfg;

    nlh->nlmsg_type = (NFNL_SUBSYS_CTNETLINK << 8) | type;
    nlh->nlmsg_flags = NLM_F_REQUEST | flags;
    nlh->nlmsg_seq = seq;
    nfg = mnl_nlmsg_put_extra_header(nlh, sizeof(*nfg));
    nfg->nfgen_family = family;
    nfg->version = version;
    nfg->res_id = 0;
    return nlh;
}

/* ---- parsing ---------------------------------------------------------- */

static int parse_ip(const struct nlattr *nest, unsigned char *src, unsigned char *dst)
{
    const struct nlattr *a;

    mnl_attr_for_each_nested(a, nest) {
        unsigned int len = mnl_attr_get_payload_len(a);
        switch (mnl_attr_get_type(a)) {
        case CTA_IP_V4_SRC:
            if (len >= 4) memcpy(src, mnl_attr_get_payload(a), 4);
            break;
        case CTA_IP_V4_DST:
            if (len >= 4) memcpy(dst, mnl_attr_get_payload(a), 4);
            break;
        case CTA_IP_V6_SRC:
            if (len >= 16) memcpy(src, mnl_attr_get_payload(a), 16);
            break;
        case CTA_IP_V6_DST:
            if (len >= 16) memcpy(dst, mnl_attr_get_payload(a), 16);
            break;
        }
    }
    return 0;
}

static unsigned short get_be16(const struct nlattr *a)
{
    return mnl_attr_get_payload_len(a) >= 2 ? ntohs(mnl_attr_get_u16(a)) : 0;
}

static unsigned int get_be32(const struct nlattr *a)
{
    return mnl_attr_get_payload_len(a) >= 4 ? ntohl(mnl_attr_get_u32(a)) : 0;
}

static unsigned char get_u8(const struct nlattr *a)
{
    return mnl_attr_get_payload_len(a) >= 1 ? mnl_attr_get_u8(a) : 0;
}

static void parse_proto(const struct nlattr *nest, struct pct_entry *e, int reply)
{
    const struct nlattr *a;

    mnl_attr_for_each_nested(a, nest) {
        switch (mnl_attr_get_type(a)) {
        case CTA_PROTO_NUM:
            if (!reply) e->proto = get_u8(a);
            break;
        case CTA_PROTO_SRC_PORT:
            e->has_ports = 1;
            if (reply) e->reply_sport = get_be16(a); else e->orig_sport = get_be16(a);
            break;
        case CTA_PROTO_DST_PORT:
            if (reply) e->reply_dport = get_be16(a); else e->orig_dport = get_be16(a);
            break;
        case CTA_PROTO_ICMP_ID:
        case CTA_PROTO_ICMPV6_ID:
            if (!reply) e->icmp_id = get_be16(a);
            break;
        case CTA_PROTO_ICMP_TYPE:
        case CTA_PROTO_ICMPV6_TYPE:
            if (!reply) e->icmp_type = get_u8(a);
            break;
        case CTA_PROTO_ICMP_CODE:
        case CTA_PROTO_ICMPV6_CODE:
            if (!reply) e->icmp_code = get_u8(a);
            break;
        }
    }
}

static void parse_tuple(const struct nlattr *nest, struct pct_entry *e, int reply)
{
    const struct nlattr *a;

    mnl_attr_for_each_nested(a, nest) {
        switch (mnl_attr_get_type(a)) {
        case CTA_TUPLE_IP:
            if (reply) parse_ip(a, e->reply_src, e->reply_dst);
            else parse_ip(a, e->orig_src, e->orig_dst);
            break;
        case CTA_TUPLE_PROTO:
            parse_proto(a, e, reply);
            break;
        case CTA_TUPLE_ZONE:
            /* a zone set for one direction only: the kernel puts it inside
             * that direction's tuple (and sends no CTA_ZONE) */
            e->zone = get_be16(a);
            e->zone_dir = reply ? PCT_ZONE_REPLY : PCT_ZONE_ORIG;
            break;
        }
    }
}

static void parse_protoinfo(const struct nlattr *nest, struct pct_entry *e)
{
    const struct nlattr *a, *b;

    mnl_attr_for_each_nested(a, nest) {
        if (mnl_attr_get_type(a) != CTA_PROTOINFO_TCP)
            continue;
        mnl_attr_for_each_nested(b, a) {
            if (mnl_attr_get_type(b) == CTA_PROTOINFO_TCP_STATE)
                e->tcp_state = get_u8(b);
        }
    }
}

int pct_parse_entry(const struct nlmsghdr *nlh, struct pct_entry *e,
                    const struct nlattr **orig_tuple)
{
    const struct nfgenmsg *nfg;
    const struct nlattr *a;
    int have_orig = 0;

    if (nlh->nlmsg_len < NLMSG_HDRLEN + sizeof(*nfg))
        return -EBADMSG;
    memset(e, 0, sizeof(*e));
    nfg = mnl_nlmsg_get_payload(nlh);
    e->family = nfg->nfgen_family;
    *orig_tuple = NULL;

    mnl_attr_for_each(a, nlh, sizeof(*nfg)) {
        switch (mnl_attr_get_type(a)) {
        case CTA_TUPLE_ORIG:
            parse_tuple(a, e, 0);
            *orig_tuple = a;
            have_orig = 1;
            break;
        case CTA_TUPLE_REPLY:
            parse_tuple(a, e, 1);
            break;
        case CTA_ZONE:   /* a zone for both directions */
            e->zone = get_be16(a);
            e->zone_dir = PCT_ZONE_BOTH;
            break;
        case CTA_MARK:
            e->mark = get_be32(a);
            break;
        case CTA_ID:
            e->id = get_be32(a);
            break;
        case CTA_STATUS:
            e->status = get_be32(a);
            break;
        case CTA_TIMEOUT:
            e->timeout = get_be32(a);
            break;
        case CTA_PROTOINFO:
            parse_protoinfo(a, e);
            break;
        }
    }
    return have_orig ? 0 : -EBADMSG;
}

/* The ICMP type of the reply direction: the kernel's own inversion of the
 * request types it tracks as connections (nf_conntrack_proto_icmp{,v6}.c). */
static unsigned char icmp_reply_type(unsigned char proto, unsigned char type)
{
    static const unsigned char v4[][2] = {{8, 0}, {0, 8}, {13, 14}, {14, 13}, {15, 16},
                                          {16, 15}, {17, 18}, {18, 17}};
    static const unsigned char v6[][2] = {{128, 129}, {129, 128}, {139, 140}, {140, 139}};
    const unsigned char (*map)[2] = proto == IPPROTO_ICMP ? v4 : v6;
    size_t i, n = proto == IPPROTO_ICMP ? sizeof(v4) / sizeof(v4[0]) : sizeof(v6) / sizeof(v6[0]);

    for (i = 0; i < n; i++)
        if (map[i][0] == type)
            return map[i][1];
    return type;
}

/* One direction's tuple of an entry, rebuilt from its parsed fields (never
 * with a CTA_TUPLE_ZONE: the zone travels as CTA_ZONE). */
static void put_tuple_dir(struct nlmsghdr *nlh, unsigned int type, const struct pct_entry *e,
                          int reply)
{
    struct nlattr *tuple, *nest;
    int v6 = e->family == AF_INET6, alen = pct_addr_len(e->family);

    tuple = mnl_attr_nest_start(nlh, type);
    nest = mnl_attr_nest_start(nlh, CTA_TUPLE_IP);
    mnl_attr_put(nlh, v6 ? CTA_IP_V6_SRC : CTA_IP_V4_SRC, alen,
                 reply ? e->reply_src : e->orig_src);
    mnl_attr_put(nlh, v6 ? CTA_IP_V6_DST : CTA_IP_V4_DST, alen,
                 reply ? e->reply_dst : e->orig_dst);
    mnl_attr_nest_end(nlh, nest);
    nest = mnl_attr_nest_start(nlh, CTA_TUPLE_PROTO);
    mnl_attr_put_u8(nlh, CTA_PROTO_NUM, e->proto);
    if (e->proto == IPPROTO_ICMP || e->proto == IPPROTO_ICMPV6) {
        int icmp4 = e->proto == IPPROTO_ICMP;
        unsigned char itype = reply ? icmp_reply_type(e->proto, e->icmp_type) : e->icmp_type;
        mnl_attr_put_u16(nlh, icmp4 ? CTA_PROTO_ICMP_ID : CTA_PROTO_ICMPV6_ID, htons(e->icmp_id));
        mnl_attr_put_u8(nlh, icmp4 ? CTA_PROTO_ICMP_TYPE : CTA_PROTO_ICMPV6_TYPE, itype);
        mnl_attr_put_u8(nlh, icmp4 ? CTA_PROTO_ICMP_CODE : CTA_PROTO_ICMPV6_CODE, e->icmp_code);
    } else if (e->has_ports) {
        mnl_attr_put_u16(nlh, CTA_PROTO_SRC_PORT, htons(reply ? e->reply_sport : e->orig_sport));
        mnl_attr_put_u16(nlh, CTA_PROTO_DST_PORT, htons(reply ? e->reply_dport : e->orig_dport));
    }
    mnl_attr_nest_end(nlh, nest);
    mnl_attr_nest_end(nlh, tuple);
}

/* The original tuple of an entry, rebuilt from its parsed fields. */
void pct_put_tuple(struct nlmsghdr *nlh, unsigned int type, const struct pct_entry *e)
{
    put_tuple_dir(nlh, type, e, 0);
}

/* The reply tuple (CTA_TUPLE_REPLY) of an entry, rebuilt from its fields. */
void pct_put_reply_tuple(struct nlmsghdr *nlh, const struct pct_entry *e)
{
    put_tuple_dir(nlh, CTA_TUPLE_REPLY, e, 1);
}

/* ---- kernel-side dump filters ---------------------------------------- */

static int full_prefix(const struct pct_prefix *p, unsigned char family)
{
    return p->plen == pct_addr_len(family) * 8;
}

static int ports_proto(unsigned char proto)
{
    /* the kernel's CTA_FILTER matches ports only for TCP and UDP */
    return proto == IPPROTO_TCP || proto == IPPROTO_UDP;
}

/* Adds the filters the kernel may apply; the shim re-checks every field of
 * every entry anyway, so a kernel that ignores one costs speed, not safety. */
void pct_put_kernel_filter(struct nlmsghdr *nlh, const struct pct_filter *f,
                           unsigned int kflags)
{
    unsigned int oflags = 0;
    int v4 = f->family == AF_INET, v6 = f->family == AF_INET6;

    if ((f->fields & PCT_F_MARK) && (kflags & PCT_K_MARK)) {
        mnl_attr_put_u32(nlh, CTA_MARK, htonl(f->mark));
        mnl_attr_put_u32(nlh, CTA_MARK_MASK, htonl(f->mark_mask));
    }
    if ((f->fields & PCT_F_ZONE) && (kflags & PCT_K_ZONE))
        mnl_attr_put_u16(nlh, CTA_ZONE, htons(f->zone));

    if (!((v4 && (kflags & PCT_K_TUPLE_V4)) || (v6 && (kflags & PCT_K_TUPLE_V6))))
        return;
    if ((f->fields & PCT_F_SRC) && full_prefix(&f->src, f->family))
        oflags |= CTA_FILTER_F_IP_SRC;
    if ((f->fields & PCT_F_DST) && full_prefix(&f->dst, f->family))
        oflags |= CTA_FILTER_F_IP_DST;
    if (f->fields & PCT_F_PROTO) {
        oflags |= CTA_FILTER_F_PROTO_NUM;
        if (ports_proto(f->proto) && (f->fields & PCT_F_SPORT) && f->sport_lo == f->sport_hi)
            oflags |= CTA_FILTER_F_SPORT;
        if (ports_proto(f->proto) && (f->fields & PCT_F_DPORT) && f->dport_lo == f->dport_hi)
            oflags |= CTA_FILTER_F_DPORT;
    }
    if (!oflags)
        return;
    {
        struct nlattr *filter, *tuple, *nest;

        filter = mnl_attr_nest_start(nlh, CTA_FILTER);
        mnl_attr_put_u32(nlh, CTA_FILTER_ORIG_FLAGS, oflags);
        mnl_attr_put_u32(nlh, CTA_FILTER_REPLY_FLAGS, 0);
        mnl_attr_nest_end(nlh, filter);

        tuple = mnl_attr_nest_start(nlh, CTA_TUPLE_ORIG);
        if (oflags & (CTA_FILTER_F_IP_SRC | CTA_FILTER_F_IP_DST)) {
            nest = mnl_attr_nest_start(nlh, CTA_TUPLE_IP);
            if (oflags & CTA_FILTER_F_IP_SRC)
                mnl_attr_put(nlh, v4 ? CTA_IP_V4_SRC : CTA_IP_V6_SRC,
                             pct_addr_len(f->family), f->src.addr);
            if (oflags & CTA_FILTER_F_IP_DST)
                mnl_attr_put(nlh, v4 ? CTA_IP_V4_DST : CTA_IP_V6_DST,
                             pct_addr_len(f->family), f->dst.addr);
            mnl_attr_nest_end(nlh, nest);
        }
        if (oflags & CTA_FILTER_F_PROTO_NUM) {
            nest = mnl_attr_nest_start(nlh, CTA_TUPLE_PROTO);
            mnl_attr_put_u8(nlh, CTA_PROTO_NUM, f->proto);
            if (oflags & CTA_FILTER_F_SPORT)
                mnl_attr_put_u16(nlh, CTA_PROTO_SRC_PORT, htons(f->sport_lo));
            if (oflags & CTA_FILTER_F_DPORT)
                mnl_attr_put_u16(nlh, CTA_PROTO_DST_PORT, htons(f->dport_lo));
            mnl_attr_nest_end(nlh, nest);
        }
        mnl_attr_nest_end(nlh, tuple);
    }
}

/* Send one request and hand every message of its answer to cb, until the
 * dump's DONE (0) or an NLMSG_ERROR: its error, or 0 for the ACK that ends a
 * request that is no dump (send those with NLM_F_ACK). */
int pct_nl_exchange(int fd, char *buf, size_t cap, struct nlmsghdr *req, unsigned int seq,
                    void (*cb)(const struct nlmsghdr *m, void *arg), void *arg)
{
    if (send(fd, req, req->nlmsg_len, 0) < 0)
        return -errno;
    for (;;) {
        const struct nlmsghdr *m;
        ssize_t n = recv(fd, buf, cap, 0);
        int left;

        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        left = (int)n;
        for (m = (const struct nlmsghdr *)buf; mnl_nlmsg_ok(m, left);
             m = mnl_nlmsg_next(m, &left)) {
            if (m->nlmsg_seq != seq)
                continue;
            if (m->nlmsg_type == NLMSG_DONE)
                return 0;
            if (m->nlmsg_type == NLMSG_ERROR) {
                /* an error, or the ACK that ends a request that is no dump */
                const struct nlmsgerr *e = mnl_nlmsg_get_payload(m);
                return e->error;
            }
            cb(m, arg);
        }
    }
}

