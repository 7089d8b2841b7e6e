/* SPDX-License-Identifier: Apache-2.0 */
/* The eBPF zone index seen from the shim: seeding it from a walk, deleting a
 * zone's matches through it (BPF reaper for TCP/UDP, batched netlink deletes
 * for the rest or where the kernel lacks zoned kfuncs), and auditing it. */
#include <arpa/inet.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>
#include <linux/genetlink.h>
#include <linux/netfilter/nfnetlink.h>
#include <linux/netfilter/nfnetlink_conntrack.h>

#include "pct.h"
#include "ct_index_loader.h"

#define SEED_BATCH 1024

/* Kernel zone direction flags (CTI_ZONE_DIR_*) <-> the shim's PCT_ZONE_*. */
static unsigned char kdir(unsigned char pct_dir)
{
    return pct_dir == PCT_ZONE_ORIG ? CTI_ZONE_DIR_ORIG
         : pct_dir == PCT_ZONE_REPLY ? CTI_ZONE_DIR_REPL : CTI_ZONE_DIR_BOTH;
}

static unsigned char pdir(unsigned char kernel_dir)
{
    return kernel_dir == CTI_ZONE_DIR_ORIG ? PCT_ZONE_ORIG
         : kernel_dir == CTI_ZONE_DIR_REPL ? PCT_ZONE_REPLY : PCT_ZONE_BOTH;
}

static int has_ports(unsigned char proto)
{
    return proto == IPPROTO_TCP || proto == IPPROTO_UDP || proto == IPPROTO_SCTP
        || proto == IPPROTO_UDPLITE || proto == 47 /* GRE keys */;
}

static int is_icmp(unsigned char proto)
{
    return proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6;
}

/* The record the netfilter program would have made for this entry. */
static void entry_to_record(const struct pct_entry *e, unsigned char zone_dir,
                            struct cti_record *r)
{
    memset(r, 0, sizeof(*r));
    r->zone_dir = zone_dir ? zone_dir : CTI_ZONE_DIR_BOTH;
    memcpy(r->saddr, e->orig_src, 16);
    memcpy(r->daddr, e->orig_dst, 16);
    r->family = e->family;
    r->proto = e->proto;
    r->zone = e->zone;
    r->hook = 255;   /* found by a walk, not by a hook */
    if (is_icmp(e->proto)) {
        r->sport = htons(e->icmp_id);
        r->icmp_type = e->icmp_type;
        r->icmp_code = e->icmp_code;
    } else if (e->has_ports) {
        r->sport = htons(e->orig_sport);
        r->dport = htons(e->orig_dport);
    }
}

static void record_to_entry(const struct cti_record *r, struct pct_entry *e)
{
    memset(e, 0, sizeof(*e));
    memcpy(e->orig_src, r->saddr, 16);
    memcpy(e->orig_dst, r->daddr, 16);
    e->family = r->family;
    e->proto = r->proto;
    e->zone = r->zone;
    e->zone_dir = pdir(r->zone_dir);
    if (is_icmp(r->proto)) {
        e->icmp_id = ntohs(r->sport);
        e->icmp_type = r->icmp_type;
        e->icmp_code = r->icmp_code;
    } else if (has_ports(r->proto) || r->sport || r->dport) {
        e->has_ports = 1;
        e->orig_sport = ntohs(r->sport);
        e->orig_dport = ntohs(r->dport);
    }
}

static int by_zone(const void *a, const void *b)
{
    const struct cti_record *x = a, *y = b;
    return (int)x->zone - (int)y->zone;
}

static int add_sorted(struct cti *c, struct cti_record *recs, int n, long long *lost)
{
    int i = 0;

    qsort(recs, n, sizeof(*recs), by_zone);
    while (i < n) {
        int j = i;
        long long rc;

        while (j < n && recs[j].zone == recs[i].zone)
            j++;
        rc = cti_add_records(c, recs[i].zone, recs + i, j - i);
        if (rc < 0)
            return (int)rc;
        *lost += rc;
        i = j;
    }
    return 0;
}

/* The next entries of the running dump matching f, with the zone taken from
 * its id whatever its direction (dirs[i]: the direction flags). */
static int dump_next_zoned(struct pct_handle *h, const struct pct_filter *f,
                           struct pct_entry *out, unsigned char *dirs, int max)
{
    int n = pct_dump_next(h, out, max), i;

    (void)f;   /* the dump's own filter (set by pct_dump_start) */
    for (i = 0; i < n; i++)
        dirs[i] = kdir(out[i].zone_dir);
    return n;
}

/* Seeding is a dump (the kernel formats every entry: most of the time) and
 * record inserts (XDP test runs): a second thread inserts one batch while the
 * dump fills the next, so attach costs about the dump alone. */
#define SEED_BUFFERS 4

struct seed_pipe {
    struct cti *c;
    struct cti_record *recs[SEED_BUFFERS];
    int count[SEED_BUFFERS];       /* records in a full buffer, 0: free */
    unsigned int filled, drained;  /* buffers handed over / inserted */
    int done, err;
    long long lost;
    pthread_mutex_t lock;
    pthread_cond_t more, room;
};

static void *seed_inserter(void *arg)
{
    struct seed_pipe *p = arg;

    pthread_mutex_lock(&p->lock);
    for (;;) {
        unsigned int b = p->drained % SEED_BUFFERS;
        int n, rc;
        long long lost = 0;

        while (p->drained == p->filled && !p->done)
            pthread_cond_wait(&p->more, &p->lock);
        if (p->drained == p->filled)
            break;
        n = p->count[b];
        pthread_mutex_unlock(&p->lock);
        rc = p->err ? 0 : add_sorted(p->c, p->recs[b], n, &lost);
        pthread_mutex_lock(&p->lock);
        if (rc < 0 && !p->err)
            p->err = rc;
        p->lost += lost;
        p->count[b] = 0;
        p->drained++;
        pthread_cond_signal(&p->room);
    }
    pthread_mutex_unlock(&p->lock);
    return NULL;
}

long long pct_index_seed(struct pct_handle *h, struct cti *c, const struct pct_filter *f,
                         unsigned int kflags, long long *lost)
{
    struct seed_pipe p;
    struct pct_entry *entries;
    unsigned char dirs[SEED_BATCH];
    pthread_t tid;
    long long seen = 0;
    int rc = 0, n = 0, i, b, started = 0;

    *lost = 0;
    memset(&p, 0, sizeof(p));
    p.c = c;
    entries = malloc(SEED_BATCH * sizeof(*entries));
    for (b = 0; b < SEED_BUFFERS; b++)
        p.recs[b] = malloc(SEED_BATCH * sizeof(struct cti_record));
    for (b = 0; b < SEED_BUFFERS; b++)
        if (!p.recs[b])
            rc = -ENOMEM;
    if (!entries)
        rc = -ENOMEM;
    if (!rc) {
        pthread_mutex_init(&p.lock, NULL);
        pthread_cond_init(&p.more, NULL);
        pthread_cond_init(&p.room, NULL);
        rc = -pthread_create(&tid, NULL, seed_inserter, &p);
        started = rc == 0;
    }
    if (!rc)
        rc = pct_dump_start(h, f, kflags);
    while (rc == 0 && (n = dump_next_zoned(h, f, entries, dirs, SEED_BATCH)) > 0) {
        pthread_mutex_lock(&p.lock);
        while (p.filled - p.drained == SEED_BUFFERS)
            pthread_cond_wait(&p.room, &p.lock);
        rc = p.err;
        pthread_mutex_unlock(&p.lock);
        if (rc)
            break;
        b = p.filled % SEED_BUFFERS;
        for (i = 0; i < n; i++)
            entry_to_record(&entries[i], dirs[i], &p.recs[b][i]);
        pthread_mutex_lock(&p.lock);
        p.count[b] = n;
        p.filled++;
        pthread_cond_signal(&p.more);
        pthread_mutex_unlock(&p.lock);
        seen += n;
    }
    if (rc == 0 && n < 0)
        rc = n;
    if (rc < 0)
        pct_dump_abort(h);
    if (started) {
        pthread_mutex_lock(&p.lock);
        p.done = 1;
        pthread_cond_signal(&p.more);
        pthread_mutex_unlock(&p.lock);
        pthread_join(tid, NULL);
        if (!rc)
            rc = p.err;
        *lost = p.lost;
        pthread_mutex_destroy(&p.lock);
        pthread_cond_destroy(&p.more);
        pthread_cond_destroy(&p.room);
    }
    free(entries);
    for (b = 0; b < SEED_BUFFERS; b++)
        free(p.recs[b]);
    return rc < 0 ? rc : seen;
}

/* The table walk (cti_walk_table) finds conntrack's table from one entry
 * of the namespace: the first TCP or UDP entry of a dump's first message
 * batch, read on a throwaway socket (closing it ends the dump; the handle's
 * own would have to read the whole dump to the end). 1 with *anchor set,
 * 0 when the namespace has no entries, -ENOENT when the batch had no TCP or
 * UDP entry (the kfunc lookup takes those only). */
static int walk_anchor(struct pct_handle *h, const char *netns_path, struct cti_record *anchor)
{
    char req[MNL_SOCKET_BUFFER_SIZE];
    struct nlmsghdr *nlh;
    const struct nlattr *orig;
    struct pct_entry e;
    unsigned int seq = ++h->seq;
    int fd, rc = 0, found = -ENOENT, left;
    ssize_t n;

    fd = pct_socket_in_netns(netns_path, NETLINK_NETFILTER);
    if (fd < 0)
        return fd;
    memset(req, 0, sizeof(req));
    nlh = pct_put_request(req, IPCTNL_MSG_CT_GET, NLM_F_DUMP, AF_UNSPEC, 0, seq);
    if (send(fd, nlh, nlh->nlmsg_len, 0) < 0) {
        rc = -errno;
        close(fd);
        return rc;
    }
    n = recv(fd, h->abuf, PCT_RBUF_SIZE, 0);
    if (n < 0)
        rc = -errno;
    left = n < 0 ? 0 : (int)n;
    for (nlh = (struct nlmsghdr *)h->abuf; rc == 0 && mnl_nlmsg_ok(nlh, left);
         nlh = mnl_nlmsg_next(nlh, &left)) {
        if (nlh->nlmsg_type == NLMSG_DONE) {
            found = found == -ENOENT ? 0 : found;
            break;
        }
        if (nlh->nlmsg_type == NLMSG_ERROR) {
            const struct nlmsgerr *err = mnl_nlmsg_get_payload(nlh);
            rc = err->error < 0 ? err->error : -EIO;
            break;
        }
        if (pct_parse_entry(nlh, &e, &orig) < 0)
            continue;
        if (e.proto == IPPROTO_TCP || e.proto == IPPROTO_UDP) {
            entry_to_record(&e, kdir(e.zone_dir), anchor);
            found = 1;
            break;
        }
    }
    close(fd);
    return rc < 0 ? rc : found;
}

/* nf_conntrack_buckets: the size of the table (one table for all
 * namespaces; the file reads the same in every one) */
static int table_buckets(unsigned int *buckets)
{
    FILE *f = fopen("/proc/sys/net/netfilter/nf_conntrack_buckets", "re");
    int rc;

    if (!f)
        return -errno;
    rc = fscanf(f, "%u", buckets) == 1 && *buckets > 0 ? 0 : -EIO;
    fclose(f);
    return rc;
}

int pct_index_walk(struct pct_handle *h, struct cti *c, const char *netns_path,
                   unsigned int threads, struct cti_walk_result *res)
{
    struct cti_record anchor;
    unsigned int buckets;
    int rc;

    memset(res, 0, sizeof(*res));
    rc = table_buckets(&buckets);
    if (rc < 0)
        return rc;
    rc = walk_anchor(h, netns_path, &anchor);
    if (rc <= 0)
        return rc;   /* 0: nothing to record */
    return cti_walk_table(c, &anchor, buckets, threads, res);
}

/* Every record of a zone with its slot; *out is malloc'd. */
static int zone_records(struct cti *c, unsigned int zone, struct cti_record **out,
                        unsigned long long **slots)
{
    struct cti_zone z;
    unsigned long long window;
    int rc;

    *out = NULL;
    *slots = NULL;
    rc = cti_zone_stats(c, zone, &z);
    if (rc < 0)
        return rc;
    window = z.head - z.tail;
    if (window > (1u << 24))
        return -E2BIG;
    *out = malloc((window + 1) * sizeof(**out));
    *slots = malloc((window + 1) * sizeof(**slots));
    if (!*out || !*slots) {
        free(*out);
        free(*slots);
        return -ENOMEM;
    }
    return cti_zone_records_at(c, zone, *out, *slots, (unsigned int)window);
}

/* A netlink delete finds an entry by its original tuple and the zone id of
 * the original direction; an entry whose zone is the reply direction's only
 * has zone 0 there, so such a delete could hit a zone-0 entry with the same
 * tuple: those records are left to a walk (counted in *unsure). */
static int netlink_deletable(const struct cti_record *r)
{
    return r->zone_dir != CTI_ZONE_DIR_REPL;
}

/* A record of a reply-direction zone: ask the kernel for the entry with
 * this original tuple (its original direction's zone is 0, which is what a
 * request without a zone looks up) and keep it only if it is the record's
 * own entry (same original tuple, zone id and direction); then it can be
 * deleted by tuple and conntrack id. 1: found (e->id set), 0: gone, -errno. */
struct reply_zone_lookup {
    const struct cti_record *r;
    struct pct_entry *e;
    int found;
};

static void match_reply_zone(const struct nlmsghdr *m, void *arg)
{
    struct reply_zone_lookup *q = arg;
    struct pct_entry got;
    const struct nlattr *orig;
    struct cti_record gr;

    if ((m->nlmsg_type & 0xff) != IPCTNL_MSG_CT_NEW || pct_parse_entry(m, &got, &orig) < 0)
        return;
    entry_to_record(&got, kdir(got.zone_dir), &gr);
    gr.hook = q->r->hook;
    gr.ts_sec = q->r->ts_sec;
    if (!memcmp(&gr, q->r, offsetof(struct cti_record, hook))) {
        *q->e = got;   /* id and reply tuple: the delete needs both */
        q->found = 1;
    }
}

static int resolve_reply_zone(struct pct_handle *h, const struct cti_record *r,
                              struct pct_entry *e)
{
    char req[MNL_SOCKET_BUFFER_SIZE];
    struct reply_zone_lookup q = { r, e, 0 };
    struct nlmsghdr *nlh;
    unsigned int seq = ++h->seq;
    int rc;

    memset(req, 0, sizeof(req));
    nlh = pct_put_request(req, IPCTNL_MSG_CT_GET, NLM_F_ACK, r->family, 0, seq);
    pct_put_tuple(nlh, CTA_TUPLE_ORIG, e);
    rc = pct_nl_exchange(mnl_socket_get_fd(h->cmd_nl), h->abuf, PCT_RBUF_SIZE, nlh, seq,
                         match_reply_zone, &q);
    if (rc == -ENOENT)
        return 0;
    return rc < 0 ? rc : q.found;
}

/* Delete these records' entries with batched netlink deletes, add the
 * outcome to res, and drop the records of entries now gone; on any failure
 * keep them all for a retry. Returns 1 when dropped, 0 when kept, or -errno. */
static int delete_and_drop(struct pct_handle *h, struct cti *c, unsigned int zone,
                           const struct pct_entry *es, const unsigned long long *slots, int n,
                           int use_zone_attr, struct pct_delete_result *res)
{
    struct pct_delete_result dr;
    int rc = pct_delete_entries(h, es, n, use_zone_attr, &dr);

    if (rc < 0)
        return rc;
    res->deleted += dr.deleted;
    res->already_gone += dr.already_gone;
    res->failed += dr.failed;
    if (!res->first_errno)
        res->first_errno = dr.first_errno;
    if (dr.failed)
        return 0;
    cti_drop_records(c, zone, slots, n);
    return 1;
}

int pct_index_delete(struct pct_handle *h, struct cti *c, const struct pct_filter *f,
                     const struct cti_filter *bf, int use_kfuncs, int use_zone_attr,
                     struct pct_delete_result *res, unsigned long long *unsure)
{
    struct cti_record *recs = NULL;
    unsigned long long *slots = NULL;
    struct pct_entry *todo = NULL, *reply = NULL;
    unsigned long long *todo_slots = NULL, *reply_slots = NULL;
    int n, i, k = 0, r = 0, rc = 0;

    memset(res, 0, sizeof(*res));
    *unsure = 0;
    if (!(f->fields & PCT_F_ZONE))
        return -EINVAL;
    if (use_kfuncs) {
        struct cti_reap_result rr;

        rc = cti_reap_zone(c, f->zone, bf, 0, &rr);
        if (rc < 0)
            return rc;
        /* still_there: expired, not yet unlinked; the table no longer
         * shows it and the next lookup or dump reaps it */
        res->deleted += rr.deleted + rr.still_there;
        res->already_gone += rr.gone;
        res->failed += rr.errors;
        if (rr.errors)
            res->first_errno = EIO;
        /* a record whose tuple now names another entry: that entry was left
         * alone; the record's own is gone, but let a walk make sure */
        *unsure += rr.foreign;
        /* the reaper counts every record its filter matched that the kfuncs
         * cannot look up (a superset of the exact matches): none, nothing left
         * to do, and no second pass over the zone */
        if (!rr.unsupported) {
            res->matched = res->deleted + res->already_gone + res->failed;
            return 0;
        }
    }
    /* the rest: protocols the kfuncs cannot look up (or every protocol on
     * kernels without zoned kfuncs) go through batched netlink deletes */
    n = zone_records(c, f->zone, &recs, &slots);
    if (n < 0)
        return n;
    todo = malloc((n + 1) * sizeof(*todo));
    todo_slots = malloc((n + 1) * sizeof(*todo_slots));
    reply = malloc((n + 1) * sizeof(*reply));
    reply_slots = malloc((n + 1) * sizeof(*reply_slots));
    if (!todo || !todo_slots || !reply || !reply_slots) {
        rc = -ENOMEM;
        goto out;
    }
    for (i = 0; i < n; i++) {
        if (use_kfuncs && (recs[i].proto == IPPROTO_TCP || recs[i].proto == IPPROTO_UDP))
            continue;
        record_to_entry(&recs[i], &todo[k]);
        if (!pct_match(f, &todo[k]))
            continue;
        if (!netlink_deletable(&recs[i])) {
            /* the reply-direction zone: found by tuple and id, never by zone */
            rc = resolve_reply_zone(h, &recs[i], &todo[k]);
            if (rc < 0)
                goto out;
            if (rc == 0) {   /* gone, or its tuple is another entry's now */
                res->already_gone++;
                cti_drop_records(c, f->zone, &slots[i], 1);
                continue;
            }
            rc = 0;
            reply_slots[r++] = slots[i];
            reply[r - 1] = todo[k];
            continue;
        }
        todo_slots[k++] = slots[i];
    }
    if (r && (rc = delete_and_drop(h, c, f->zone, reply, reply_slots, r, use_zone_attr,
                                   res)) < 0)
        goto out;
    rc = 0;
    if (k) {
        rc = delete_and_drop(h, c, f->zone, todo, todo_slots, k, use_zone_attr, res);
        if (rc < 0)
            goto out;
        if (rc > 0) {
            rc = 0;
            if (use_kfuncs) {   /* compact the zone: move its tail past the holes */
                struct cti_reap_result pr;
                cti_prune_zone(c, f->zone, 0, &pr);
            }
        }
    }
    res->matched = res->deleted + res->already_gone + res->failed;
out:
    free(recs);
    free(slots);
    free(todo);
    free(todo_slots);
    free(reply);
    free(reply_slots);
    return rc;
}

struct dropped {
    unsigned int zone;
    unsigned long long slot;
};

int pct_index_delete_each(struct pct_handle *h, struct cti *c, const struct pct_filter *fs,
                          int n, int use_kfuncs, int use_zone_attr,
                          struct pct_delete_result *res, struct pct_delete_result *per_filter,
                          unsigned long long *unsure)
{
    struct pct_ack_counts acks = {0};
    struct dropped *drops = NULL;
    size_t n_drops = 0, cap_drops = 0;
    int *idx, i, j, err = 0;

    memset(res, 0, sizeof(*res));
    memset(per_filter, 0, sizeof(*per_filter) * n);
    *unsure = 0;
    for (i = 0; i < n; i++)
        if (!(fs[i].fields & PCT_F_ZONE))
            return -EINVAL;
    idx = malloc(n * sizeof(*idx));
    if (!idx)
        return -ENOMEM;
    h->owners = per_filter;
    for (i = 0; i < n && !err; i++) {
        struct cti_record *recs;
        unsigned long long *slots;
        int k = 0, nrec, r;

        for (j = 0; j < i && fs[j].zone != fs[i].zone; j++)
            ;
        if (j < i)
            continue;   /* zone already done */
        for (j = i; j < n; j++)
            if (fs[j].zone == fs[i].zone)
                idx[k++] = j;
        nrec = zone_records(c, fs[i].zone, &recs, &slots);
        if (nrec < 0) {
            err = nrec;
            break;
        }
        for (r = 0; r < nrec && !err; r++) {
            struct pct_entry e;
            int m, which = -1;

            record_to_entry(&recs[r], &e);
            for (m = 0; m < k; m++)
                if (pct_match(&fs[idx[m]], &e)) {
                    which = idx[m];
                    break;
                }
            if (which < 0)
                continue;
            if (!netlink_deletable(&recs[r])) {
                (*unsure)++;
                continue;
            }
            res->matched++;
            per_filter[which].matched++;
            h->owner = which;
            err = pct_queue_delete(h, &e, NULL, use_zone_attr, &acks);
            if (err)
                break;
            if (n_drops == cap_drops) {
                struct dropped *more;
                cap_drops = cap_drops ? 2 * cap_drops : 256;
                more = realloc(drops, cap_drops * sizeof(*drops));
                if (!more) {
                    err = -ENOMEM;
                    break;
                }
                drops = more;
            }
            drops[n_drops].zone = fs[i].zone;
            drops[n_drops++].slot = slots[r];
        }
        free(recs);
        free(slots);
    }
    err = pct_batch_finish(h, &acks, err, res);
    /* records of entries now gone; on failures keep them all for a retry */
    if (!err && !res->failed) {
        size_t d;
        for (d = 0; d < n_drops; d++)
            cti_drop_records(c, drops[d].zone, &drops[d].slot, 1);
        if (use_kfuncs)   /* compact the touched zones */
            for (i = 0; i < n; i++) {
                struct cti_reap_result pr;
                for (j = 0; j < i && fs[j].zone != fs[i].zone; j++)
                    ;
                if (j == i)
                    cti_prune_zone(c, fs[i].zone, 0, &pr);
            }
    }
    free(drops);
    free(idx);
    return err;
}

/* ---- audit: live entries the index does not hold -------------------------- */

struct rec_set {
    struct cti_record *slots;
    unsigned char *used;
    size_t cap, count;
};

static unsigned long long rec_hash(const struct cti_record *r)
{
    const unsigned char *p = (const unsigned char *)r;
    unsigned long long h = 1469598103934665603ULL;
    size_t i;

    /* addresses, ports, family, proto, icmp type/code, zone, zone_dir */
    for (i = 0; i < offsetof(struct cti_record, hook); i++)
        h = (h ^ p[i]) * 1099511628211ULL;
    return h;
}

static int rec_eq(const struct cti_record *a, const struct cti_record *b)
{
    return !memcmp(a, b, offsetof(struct cti_record, hook));
}

static int set_add(struct rec_set *s, const struct cti_record *r)
{
    size_t i = rec_hash(r) & (s->cap - 1);

    if (2 * (s->count + 1) > s->cap)
        return -1;   /* grew since it was sized: stay at most half full */
    while (s->used[i]) {
        if (rec_eq(&s->slots[i], r))
            return 0;
        i = (i + 1) & (s->cap - 1);
    }
    s->used[i] = 1;
    s->slots[i] = *r;
    s->count++;
    return 1;
}

static int set_has(const struct rec_set *s, const struct cti_record *r)
{
    size_t i = rec_hash(r) & (s->cap - 1);

    while (s->used[i]) {
        if (rec_eq(&s->slots[i], r))
            return 1;
        i = (i + 1) & (s->cap - 1);
    }
    return 0;
}

/* Walks the table once; copies up to max missing entries into missing[]
 * and returns how many live entries have no record (or -errno). */
long long pct_index_audit(struct pct_handle *h, struct cti *c, struct pct_entry *missing,
                          int max, unsigned long long *checked, int add, long long *lost)
{
    struct rec_set set = {0};
    struct pct_entry *batch = NULL;
    unsigned char dirs[SEED_BATCH];
    unsigned long long total = 0;
    long long n_missing = 0;
    unsigned int zone;
    struct pct_filter all;
    int rc = 0, n, i;

    *checked = 0;
    *lost = 0;
    for (zone = 0; zone < CTI_MAX_ZONES; zone++) {
        struct cti_zone z;
        if (cti_zone_stats(c, zone, &z) == 0)
            total += z.head - z.tail;
    }
    for (set.cap = 1024; set.cap < 2 * total + 1; set.cap <<= 1)
        ;
    set.slots = malloc(set.cap * sizeof(*set.slots));
    set.used = calloc(set.cap, 1);
    batch = malloc(SEED_BATCH * sizeof(*batch));
    if (!set.slots || !set.used || !batch) {
        rc = -ENOMEM;
        goto out;
    }
    for (zone = 0; zone < CTI_MAX_ZONES; zone++) {
        struct cti_record *recs;
        unsigned long long *slots;
        struct cti_zone z;

        if (cti_zone_stats(c, zone, &z) < 0 || z.head == z.tail)
            continue;
        n = zone_records(c, zone, &recs, &slots);
        if (n < 0) {
            rc = n;
            goto out;
        }
        for (i = 0; i < n; i++) {
            recs[i].hook = 0;
            recs[i].ts_sec = 0;
            if (!(recs[i].zone_dir & CTI_ZONE_DIR_BOTH))
                recs[i].zone_dir = CTI_ZONE_DIR_BOTH;
            set_add(&set, &recs[i]);
        }
        free(recs);
        free(slots);
    }
    memset(&all, 0, sizeof(all));
    rc = pct_dump_start(h, &all, 0);
    while (rc == 0 && (n = dump_next_zoned(h, &all, batch, dirs, SEED_BATCH)) > 0) {
        for (i = 0; i < n && rc == 0; i++) {
            struct cti_record r;

            entry_to_record(&batch[i], dirs[i], &r);
            (*checked)++;
            if (set_has(&set, &r))
                continue;
            if (add) {
                long long rc2 = cti_add_records(c, r.zone, &r, 1);
                if (rc2 < 0) {
                    rc = (int)rc2;
                    break;
                }
                *lost += rc2;
            }
            if (n_missing < max)
                missing[n_missing] = batch[i];
            n_missing++;
        }
    }
    if (rc == 0 && n < 0)
        rc = n;
    if (rc < 0)
        pct_dump_abort(h);
out:
    free(set.slots);
    free(set.used);
    free(batch);
    return rc < 0 ? rc : n_missing;
}

/* ---- creators the hooks do not see --------------------------------------- */

/* Send one dump request on fd and call cb for each reply message; returns
 * 0 or -errno (an NLMSG_ERROR reply's errno). */
static void sum_insert(const struct nlmsghdr *m, void *arg)
{
    const struct nlattr *a;

    mnl_attr_for_each(a, m, sizeof(struct nfgenmsg)) {
        if (mnl_attr_get_type(a) == CTA_STATS_INSERT && mnl_attr_get_payload_len(a) >= 4)
            *(unsigned long long *)arg += ntohl(mnl_attr_get_u32(a));
    }
}

static void count_msgs(const struct nlmsghdr *m, void *arg)
{
    (void)m;
    (*(int *)arg)++;
}

static void genl_family_id(const struct nlmsghdr *m, void *arg)
{
    const struct nlattr *a;

    mnl_attr_for_each(a, m, sizeof(struct genlmsghdr)) {
        if (mnl_attr_get_type(a) == CTRL_ATTR_FAMILY_ID)
            *(int *)arg = mnl_attr_get_u16(a);
    }
}

/* Open vSwitch datapaths living in the namespace of socket fd (0 when the
 * openvswitch module is not loaded). */
static int ovs_datapaths(int fd, char *buf, size_t cap, unsigned int *seq)
{
    char req[256];
    struct nlmsghdr *nlh;
    struct genlmsghdr *g;
    int family = -1, count = 0, rc;

    memset(req, 0, sizeof(req));
    nlh = mnl_nlmsg_put_header(req);
    nlh->nlmsg_type = GENL_ID_CTRL;
    nlh->nlmsg_flags = NLM_F_REQUEST | NLM_F_ACK;
    nlh->nlmsg_seq = ++*seq;
    g = mnl_nlmsg_put_extra_header(nlh, sizeof(*g));
    g->cmd = CTRL_CMD_GETFAMILY;
    g->version = 1;
    mnl_attr_put_strz(nlh, CTRL_ATTR_FAMILY_NAME, "ovs_datapath");
    rc = pct_nl_exchange(fd, buf, cap, nlh, nlh->nlmsg_seq, genl_family_id, &family);
    if (rc == -ENOENT)
        return 0;   /* no openvswitch module: no kernel datapath anywhere */
    if (rc < 0)
        return rc;
    if (family < 0)
        return -EBADMSG;
    memset(req, 0, sizeof(req));
    nlh = mnl_nlmsg_put_header(req);
    nlh->nlmsg_type = family;
    nlh->nlmsg_flags = NLM_F_REQUEST | NLM_F_DUMP;
    nlh->nlmsg_seq = ++*seq;
    g = mnl_nlmsg_put_extra_header(nlh, sizeof(*g));
    g->cmd = 3;     /* OVS_DP_CMD_GET */
    g->version = 2; /* OVS_DATAPATH_VERSION */
    mnl_nlmsg_put_extra_header(nlh, sizeof(int));   /* struct ovs_header: dp_ifindex 0 */
    rc = pct_nl_exchange(fd, buf, cap, nlh, nlh->nlmsg_seq, count_msgs, &count);
    return rc < 0 ? rc : count;
}

int pct_index_blind_spots(struct pct_handle *h, const char *netns_path,
                          unsigned long long *insert, int *ovs_dps, int *bridge_tables)
{
    char req[MNL_SOCKET_BUFFER_SIZE];
    struct nlmsghdr *nlh;
    unsigned int seq;
    int fd = mnl_socket_get_fd(h->cmd_nl), rc, gfd;

    *insert = 0;
    *ovs_dps = -1;
    *bridge_tables = 0;
    if (h->batch_count)
        return -EBUSY;
    /* per-CPU statistics of this namespace: entries inserted by ctnetlink
     * (and bpf_ct_insert_entry) count in "insert", packet-created ones do not */
    memset(req, 0, sizeof(req));
    seq = ++h->seq;
    nlh = pct_put_request(req, IPCTNL_MSG_CT_GET_STATS_CPU, NLM_F_DUMP, AF_UNSPEC, 0, seq);
    rc = pct_nl_exchange(fd, h->abuf, PCT_RBUF_SIZE, nlh, seq, sum_insert, insert);
    if (rc < 0)
        return rc;
    /* nftables bridge-family tables: bridge conntrack uses NFPROTO_BRIDGE
     * hooks, which netfilter BPF programs cannot attach to */
    memset(req, 0, sizeof(req));
    seq = ++h->seq;
    nlh = mnl_nlmsg_put_header(req);
    nlh->nlmsg_type = (NFNL_SUBSYS_NFTABLES << 8) | 1 /* NFT_MSG_GETTABLE */;
    nlh->nlmsg_flags = NLM_F_REQUEST | NLM_F_DUMP;
    nlh->nlmsg_seq = seq;
    {
        struct nfgenmsg *nfg = mnl_nlmsg_put_extra_header(nlh, sizeof(*nfg));
        nfg->nfgen_family = 7; /* NFPROTO_BRIDGE */
        nfg->version = NFNETLINK_V0;
    }
    rc = pct_nl_exchange(fd, h->abuf, PCT_RBUF_SIZE, nlh, seq, count_msgs, bridge_tables);
    if (rc == -ENOENT || rc == -EOPNOTSUPP || rc == -EPROTONOSUPPORT)
        rc = 0;   /* no nf_tables: no bridge tables */
    if (rc < 0)
        return rc;
    /* Open vSwitch's datapath: its ct() action creates entries without
     * crossing netfilter hooks */
    gfd = pct_socket_in_netns(netns_path, NETLINK_GENERIC);
    if (gfd < 0)
        return gfd;
    seq = 0;
    *ovs_dps = ovs_datapaths(gfd, h->abuf, PCT_RBUF_SIZE, &seq);
    close(gfd);
    return 0;
}
