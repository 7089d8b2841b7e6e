/* SPDX-License-Identifier: Apache-2.0 */
/* Deleting: batched per-entry DELETEs behind one walk, and the one-message
 * flush for kernels the probe proved safe. */
#include <arpa/inet.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <linux/netfilter/nfnetlink.h>
#include <linux/netfilter/nfnetlink_conntrack.h>

#include "pct.h"

/* ---- batches of requests, one ack each ------------------------------- */

char *pct_batch_slot(struct pct_handle *h, size_t need,
                     struct pct_ack_counts *acks, int *err)
{
    *err = 0;
    if (h->batch_count >= PCT_BATCH_MAX || h->slen + need > PCT_SBUF_SIZE) {
        *err = pct_batch_flush(h, acks);
        if (*err)
            return NULL;
    }
    if (h->batch_count == 0)
        h->batch_first_seq = h->seq + 1;
    return h->sbuf + h->slen;
}

void pct_batch_commit(struct pct_handle *h, const struct nlmsghdr *nlh)
{
    h->slen += NLMSG_ALIGN(nlh->nlmsg_len);
    h->batch_owner[h->batch_count] = h->owner;
    if (h->owners && h->owner >= 0)
        h->owners[h->owner].deleted++;   /* until an error says otherwise */
    h->batch_count++;
}

/* An error came back for request idx of the batch: move it from the
 * owner's deleted count to the right bucket. */
static void owner_error(struct pct_handle *h, unsigned int idx, int error)
{
    struct pct_delete_result *r;
    int owner;

    if (!h->owners || idx >= PCT_BATCH_MAX)
        return;
    owner = h->batch_owner[idx];
    if (owner < 0)
        return;
    r = &h->owners[owner];
    r->deleted--;
    if (error == -ENOENT) {
        r->already_gone++;
    } else {
        r->failed++;
        if (!r->first_errno)
            r->first_errno = -error;
    }
}

static void count_ack(struct pct_ack_counts *acks, int error)
{
    if (error == 0) {
        acks->ok++;
    } else if (error == -ENOENT) {
        acks->enoent++;
    } else {
        acks->failed++;
        if (!acks->first_errno)
            acks->first_errno = -error;
    }
}

/* Send the pending requests in one sendmsg. The kernel handles them in order
 * inside the sendmsg and queues an error message for each one that failed
 * before sendmsg returns, so success needs no ack: requests without
 * NLM_F_ACK that produced no error succeeded. Those with NLM_F_ACK (single
 * requests) are also answered on success. */
int pct_batch_flush(struct pct_handle *h, struct pct_ack_counts *acks)
{
    int pending = h->batch_count, fd = mnl_socket_get_fd(h->cmd_nl);
    int acked = h->batch_acked, answered = 0, errors = 0;
    unsigned int first = h->batch_first_seq;

    if (!pending)
        return 0;
    h->batch_count = 0;
    h->batch_acked = 0;
    if (mnl_socket_sendto(h->cmd_nl, h->sbuf, h->slen) < 0) {
        h->slen = 0;
        return -errno;
    }
    h->slen = 0;
    for (;;) {
        const struct nlmsghdr *nlh;
        /* block only while an explicitly requested ack is still missing */
        ssize_t n = recv(fd, h->abuf, PCT_RBUF_SIZE, answered < acked ? 0 : MSG_DONTWAIT);
        int left;

        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                break;
            return -errno;   /* ENOBUFS: outcomes unknown, fail loudly */
        }
        left = (int)n;
        for (nlh = (const struct nlmsghdr *)h->abuf; mnl_nlmsg_ok(nlh, left);
             nlh = mnl_nlmsg_next(nlh, &left)) {
            const struct nlmsgerr *e;

            if (nlh->nlmsg_type != NLMSG_ERROR)
                continue;
            if (nlh->nlmsg_seq - first >= (unsigned int)PCT_BATCH_MAX)
                continue;   /* not from this batch */
            e = mnl_nlmsg_get_payload(nlh);
            answered++;
            if (e->error) {
                errors++;
                count_ack(acks, e->error);
                owner_error(h, nlh->nlmsg_seq - first, e->error);
            }
        }
    }
    acks->ok += (unsigned long long)(pending - errors);
    return 0;
}

/* One request, waiting for its ack; returns 0 or -errno from the kernel. */
int pct_request(struct pct_handle *h, struct nlmsghdr *nlh)
{
    struct pct_ack_counts acks = {0};
    char *slot;
    int err;

    if (h->batch_count) {
        err = pct_batch_flush(h, &acks);
        if (err)
            return err;
        memset(&acks, 0, sizeof(acks));
    }
    slot = pct_batch_slot(h, nlh->nlmsg_len, &acks, &err);
    if (!slot)
        return err;
    nlh->nlmsg_flags |= NLM_F_ACK;
    nlh->nlmsg_seq = ++h->seq;
    h->batch_first_seq = nlh->nlmsg_seq;
    memcpy(slot, nlh, nlh->nlmsg_len);
    pct_batch_commit(h, nlh);
    h->batch_acked++;
    err = pct_batch_flush(h, &acks);
    if (err)
        return err;
    return acks.ok ? 0 : (acks.enoent ? -ENOENT : -acks.first_errno);
}

/* Send what is still queued (after an error too: those requests count),
 * end per-filter accounting and fill res; returns err, else the send's. */
int pct_batch_finish(struct pct_handle *h, struct pct_ack_counts *acks, int err,
                     struct pct_delete_result *res)
{
    int rc = pct_batch_flush(h, acks);

    h->owners = NULL;
    h->owner = -1;
    pct_fill_result(res, acks);
    return err ? err : rc;
}

void pct_fill_result(struct pct_delete_result *res, const struct pct_ack_counts *acks)
{
    res->deleted = acks->ok;
    res->already_gone = acks->enoent;
    res->failed = acks->failed;
    res->first_errno = acks->first_errno;
}

/* ---- the walk ------------------------------------------------------------ */

/* The fields every filter agrees on can be filtered by the kernel. */
static void common_filter(const struct pct_filter *fs, int n, struct pct_filter *c)
{
    int i;

    *c = fs[0];
    if (n == 1)
        return;
    c->fields &= PCT_F_ZONE | PCT_F_FAMILY | PCT_F_MARK;
    for (i = 1; i < n; i++) {
        const struct pct_filter *f = &fs[i];
        if (!(f->fields & PCT_F_ZONE) || f->zone != c->zone)
            c->fields &= ~PCT_F_ZONE;
        if (!(f->fields & PCT_F_FAMILY) || f->family != c->family)
            c->fields &= ~PCT_F_FAMILY;
        if (!(f->fields & PCT_F_MARK) || f->mark != c->mark || f->mark_mask != c->mark_mask)
            c->fields &= ~PCT_F_MARK;
    }
}

/* Many filters: group them by zone so an entry is checked only against the
 * filters of its own zone and those without a zone, in filter order. */
struct filter_groups {
    int *by_zone;       /* filter indices grouped by zone, ascending within a group */
    int *start;         /* start[z] .. start[z + 1]: zone z's group */
    int *any;           /* filters without a zone */
    int n_any;
};

static void groups_free(struct filter_groups *g)
{
    free(g->by_zone);
    free(g->start);
    free(g->any);
    memset(g, 0, sizeof(*g));
}

static int groups_build(struct filter_groups *g, const struct pct_filter *fs, int n)
{
    int i, z, *fill;

    memset(g, 0, sizeof(*g));
    g->by_zone = malloc(n * sizeof(int));
    g->start = calloc(65537, sizeof(int));
    g->any = malloc(n * sizeof(int));
    fill = calloc(65536, sizeof(int));
    if (!g->by_zone || !g->start || !g->any || !fill) {
        free(fill);
        groups_free(g);
        return -ENOMEM;
    }
    for (i = 0; i < n; i++)
        if (fs[i].fields & PCT_F_ZONE)
            g->start[fs[i].zone + 1]++;
    for (z = 0; z < 65536; z++)
        g->start[z + 1] += g->start[z];
    for (i = 0; i < n; i++) {
        if (fs[i].fields & PCT_F_ZONE) {
            z = fs[i].zone;
            g->by_zone[g->start[z] + fill[z]++] = i;
        } else {
            g->any[g->n_any++] = i;
        }
    }
    free(fill);
    return 0;
}

/* index of the first filter matching e, or -1 */
static int first_match(const struct pct_filter *fs, int n, const struct filter_groups *g,
                       const struct pct_entry *e)
{
    int i, best = -1;

    if (!g->start) {
        for (i = 0; i < n; i++)
            if (pct_match(&fs[i], e))
                return i;
        return -1;
    }
    for (i = g->start[e->zone]; i < g->start[e->zone + 1]; i++)
        if (pct_match(&fs[g->by_zone[i]], e)) {
            best = g->by_zone[i];
            break;
        }
    for (i = 0; i < g->n_any && (best < 0 || g->any[i] < best); i++)
        if (pct_match(&fs[g->any[i]], e))
            return g->any[i];
    return best;
}

/* orig: the raw tuple attribute from the dump, or NULL to rebuild it */
int pct_queue_delete(struct pct_handle *h, const struct pct_entry *e,
                     const struct nlattr *orig, int use_zone_attr,
                     struct pct_ack_counts *acks)
{
    struct nlmsghdr *nlh;
    char *slot;
    int err;

    slot = pct_batch_slot(h, NLMSG_HDRLEN + 256 + (orig ? orig->nla_len : 0), acks, &err);
    if (!slot)
        return err;
    nlh = pct_put_request(slot, IPCTNL_MSG_CT_DELETE, 0, e->family, 0, ++h->seq);
    /* The lookup key is a tuple and a zone. The kernel hashes and compares a
     * tuple under the zone id of the tuple's own direction
     * (nf_ct_zone_id(zone, dir)), so each zone form is looked up through the
     * direction its zone applies to, with CTA_ZONE carrying the id:
     * - both, or original only: the original tuple;
     * - reply only: the reply tuple. Through the original tuple it would be
     *   looked up in zone 0, where a newer zone-0 connection reusing the tuple
     *   would be hit (its conntrack id can even be equal: the id hashes the
     *   object's address, which the slab reuses).
     * A one-direction zone comes inside the dumped tuple (CTA_TUPLE_ZONE),
     * which the kernel refuses next to a non-zero CTA_ZONE (EINVAL): such
     * tuples are rebuilt without it. */
    if (e->zone_dir == PCT_ZONE_REPLY)
        pct_put_reply_tuple(nlh, e);
    else if (orig && e->zone_dir == PCT_ZONE_BOTH)
        mnl_attr_put(nlh, orig->nla_type, mnl_attr_get_payload_len(orig),
                     mnl_attr_get_payload(orig));
    else
        pct_put_tuple(nlh, CTA_TUPLE_ORIG, e);
    /* id: never hit a newer connection that reuses the tuple in that zone */
    if (use_zone_attr)
        mnl_attr_put_u16(nlh, CTA_ZONE, htons(e->zone));
    if (e->id)   /* 0: unknown (an index record), delete by tuple and zone */
        mnl_attr_put_u32(nlh, CTA_ID, htonl(e->id));
    pct_batch_commit(h, nlh);
    return 0;
}

int pct_delete_walk(struct pct_handle *h, const struct pct_filter *filters, int n,
                    unsigned int kflags, int dry_run, int use_zone_attr,
                    struct pct_delete_result *res, struct pct_delete_result *per_filter)
{
    struct pct_ack_counts acks = {0};
    const struct nlmsghdr *nlh;
    const struct nlattr *orig;
    struct pct_filter common;
    struct filter_groups groups = {0};
    struct pct_entry e;
    int rc, err = 0;

    memset(res, 0, sizeof(*res));
    if (n < 1)
        return -EINVAL;
    if (n > 8 && (rc = groups_build(&groups, filters, n)) < 0)
        return rc;
    common_filter(filters, n, &common);
    if (n > 1)
        kflags &= ~(PCT_K_TUPLE_V4 | PCT_K_TUPLE_V6);
    if (per_filter)
        memset(per_filter, 0, sizeof(*per_filter) * n);
    rc = pct_dump_start(h, &common, kflags);
    if (rc < 0) {
        groups_free(&groups);
        return rc;
    }
    res->walks = 1;
    h->owners = per_filter;
    while ((rc = pct_next_msg(h, &nlh)) > 0) {
        int which;

        res->dumped++;
        if (pct_parse_entry(nlh, &e, &orig) < 0)
            continue;
        which = first_match(filters, n, &groups, &e);
        if (which < 0)
            continue;
        res->matched++;
        if (per_filter)
            per_filter[which].matched++;
        if (dry_run)
            continue;
        h->owner = which;
        err = pct_queue_delete(h, &e, orig, use_zone_attr, &acks);
        if (err)
            break;
    }
    if (err)
        pct_dump_abort(h);
    else if (rc < 0)
        err = rc;
    groups_free(&groups);
    return pct_batch_finish(h, &acks, err, res);
}

int pct_delete_entries(struct pct_handle *h, const struct pct_entry *entries, int n,
                       int use_zone_attr, struct pct_delete_result *res)
{
    struct pct_ack_counts acks = {0};
    int i, err = 0;

    memset(res, 0, sizeof(*res));
    for (i = 0; i < n && !err; i++) {
        if (entries[i].family != AF_INET && entries[i].family != AF_INET6)
            err = -EAFNOSUPPORT;
        else
            err = pct_queue_delete(h, &entries[i], NULL, use_zone_attr, &acks);
    }
    err = pct_batch_finish(h, &acks, err, res);
    res->matched = n;
    return err;
}

/* ---- flush and stats ----------------------------------------------------- */

int pct_flush(struct pct_handle *h, const struct pct_filter *f)
{
    char buf[MNL_SOCKET_BUFFER_SIZE];
    memset(buf, 0, MNL_SOCKET_BUFFER_SIZE);  /* never send uninitialised padding */
    struct nlmsghdr *nlh;
    unsigned char family = (f->fields & PCT_F_FAMILY) ? f->family : 0;

    /* A flush may carry nothing the kernel could silently ignore beyond what
     * the probe proved: refuse anything else outright. */
    if (f->fields & ~(PCT_F_ZONE | PCT_F_FAMILY | PCT_F_MARK))
        return -EINVAL;
    if (!(f->fields & PCT_F_ZONE))
        return -EINVAL;
    /* version 1: the kernel honours the family only then */
    nlh = pct_put_request(buf, IPCTNL_MSG_CT_DELETE, 0, family, 1, 0);
    mnl_attr_put_u16(nlh, CTA_ZONE, htons(f->zone));
    if (f->fields & PCT_F_MARK) {
        mnl_attr_put_u32(nlh, CTA_MARK, htonl(f->mark));
        mnl_attr_put_u32(nlh, CTA_MARK_MASK, htonl(f->mark_mask));
    }
    return pct_request(h, nlh);
}

static void global_entries(const struct nlmsghdr *m, void *arg)
{
    const struct nlattr *a;

    mnl_attr_for_each(a, m, sizeof(struct nfgenmsg)) {
        if (mnl_attr_get_type(a) == CTA_STATS_GLOBAL_ENTRIES)
            *(long long *)arg = ntohl(mnl_attr_get_u32(a));
    }
}

long long pct_table_count(struct pct_handle *h)
{
    char buf[MNL_SOCKET_BUFFER_SIZE];
    struct nlmsghdr *nlh;
    unsigned int seq = ++h->seq;
    long long entries = -1;
    int rc;

    memset(buf, 0, sizeof(buf));  /* never send uninitialised padding */
    nlh = pct_put_request(buf, IPCTNL_MSG_CT_GET_STATS, NLM_F_ACK, AF_UNSPEC, 0, seq);
    rc = pct_nl_exchange(mnl_socket_get_fd(h->cmd_nl), h->abuf, PCT_RBUF_SIZE, nlh, seq,
                         global_entries, &entries);
    if (rc < 0)
        return rc;
    return entries < 0 ? -EBADMSG : entries;
}
