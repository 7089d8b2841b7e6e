/* SPDX-License-Identifier: Apache-2.0 */
/* Probing what this kernel really does with dump and flush filters, in a
 * throwaway network namespace holding only sentinel entries. Kernels drop
 * attributes they do not know, so a filter is trusted only once seen to work. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>
#include <linux/netfilter/nfnetlink.h>
#include <linux/netfilter/nfnetlink_conntrack.h>

#include "pct.h"

struct sentinel {
    unsigned char family;
    unsigned short zone;
    unsigned char last;     /* last byte of the source address: identity */
    unsigned int mark;
};

/* bit i of a set = sentinel i */
static const struct sentinel sentinels[] = {
    { AF_INET,  0, 1, 1 },   /* A */
    { AF_INET,  5, 2, 2 },   /* B */
    { AF_INET,  6, 3, 1 },   /* C */
    { AF_INET6, 5, 2, 2 },   /* D */
    { AF_INET6, 0, 1, 3 },   /* E */
    { AF_INET,  6, 4, 2 },   /* F */
};
#define N_SENTINELS ((int)(sizeof(sentinels) / sizeof(sentinels[0])))
#define ALL ((1u << N_SENTINELS) - 1)
#define BIT(i) (1u << (i))
enum { A, B, C, D, E, F };

static void sentinel_src(const struct sentinel *s, unsigned char *addr)
{
    memset(addr, 0, 16);
    if (s->family == AF_INET) {
        addr[0] = 10; addr[3] = s->last;
    } else {
        addr[0] = 0xfd; addr[15] = s->last;
    }
}

/* Create sentinel i; *existed = 1 when the kernel answered EEXIST (it was
 * there already: the create then changed nothing). */
static int create_one(struct pct_handle *h, int i, int use_zone, int *existed)
{
    struct pct_create_spec spec;
    unsigned long long failed;
    int first;
    long long rc;

    *existed = 0;
    memset(&spec, 0, sizeof(spec));
    spec.family = sentinels[i].family;
    spec.proto = IPPROTO_UDP;
    spec.zone = sentinels[i].zone;
    spec.use_zone = use_zone;
    sentinel_src(&sentinels[i], spec.src);
    memcpy(spec.dst, spec.src, 16);
    spec.dst[spec.family == AF_INET ? 3 : 15] = 200;
    spec.sport_base = 1000;
    spec.dport = 53;
    spec.mark = sentinels[i].mark;
    spec.timeout = 600;
    spec.count = 1;
    rc = pct_create(h, &spec, &failed, &first);
    if (rc < 0)
        return (int)rc;
    if (rc == 0 && first == EEXIST)
        *existed = 1;
    else if (rc == 0)
        return first ? -first : -EIO;
    return 0;
}

static int create_sentinels(struct pct_handle *h, unsigned int which, int use_zone)
{
    int i, existed, rc;

    for (i = 0; i < N_SENTINELS; i++) {
        if (!(which & BIT(i)))
            continue;
        rc = create_one(h, i, use_zone, &existed);
        if (rc < 0)
            return rc;
    }
    return 0;
}

/* Which sentinels a flush left, learnt without a dump, and the table reset
 * to all of them: each is created again, EEXIST meaning it survived. A
 * create is one hash lookup; a dump walks every bucket of the hash table
 * that all namespaces share (seconds when another namespace holds 1M
 * entries), so this halves the probe's walks. */
static int survivors_then_reset(struct pct_handle *h, unsigned int *set)
{
    int i, existed, rc;

    *set = 0;
    for (i = 0; i < N_SENTINELS; i++) {
        rc = create_one(h, i, 1, &existed);
        if (rc < 0)
            return rc;
        if (existed)
            *set |= BIT(i);
    }
    return 0;
}

static int which_sentinel(const struct pct_entry *e)
{
    int i;

    for (i = 0; i < N_SENTINELS; i++) {
        unsigned char src[16];
        sentinel_src(&sentinels[i], src);
        if (e->family == sentinels[i].family
            && !memcmp(e->orig_src, src, pct_addr_len(e->family)))
            return i;
    }
    return -1;
}

/* What the kernel returns for this dump, as a set of sentinels; no re-check. */
static int raw_dump(struct pct_handle *h, const struct pct_filter *f,
                    unsigned int kflags, unsigned int *set)
{
    const struct nlmsghdr *nlh;
    const struct nlattr *orig;
    struct pct_entry e;
    int rc;

    *set = 0;
    rc = pct_dump_start(h, f, kflags);
    if (rc < 0)
        return rc;
    while ((rc = pct_next_msg(h, &nlh)) > 0) {
        int i;
        if (pct_parse_entry(nlh, &e, &orig) < 0)
            continue;
        i = which_sentinel(&e);
        if (i >= 0)
            *set |= BIT(i);
    }
    return rc;
}

static void src_filter(struct pct_filter *f, int i)
{
    memset(f, 0, sizeof(*f));
    f->fields = PCT_F_FAMILY | PCT_F_SRC;
    f->family = sentinels[i].family;
    sentinel_src(&sentinels[i], f->src.addr);
    f->src.plen = (unsigned char)(pct_addr_len(f->family) * 8);
}

/* needs the table to hold exactly all sentinels; leaves it so */
static int flush_filter_ok(struct pct_handle *h)
{
    char buf[MNL_SOCKET_BUFFER_SIZE];
    memset(buf, 0, MNL_SOCKET_BUFFER_SIZE);  /* never send uninitialised padding */
    struct nlmsghdr *nlh;
    struct pct_filter f;
    unsigned int set;
    int rc;

    src_filter(&f, B);
    nlh = pct_put_request(buf, IPCTNL_MSG_CT_DELETE, 0, AF_INET, 1, 0);
    pct_put_kernel_filter(nlh, &f, PCT_K_TUPLE_V4);
    rc = pct_request(h, nlh);
    if (survivors_then_reset(h, &set) < 0)
        return 0;
    return rc == 0 && set == (ALL & ~BIT(B));
}

static void run_probe(struct pct_handle *h, struct pct_caps *c)
{
    struct pct_filter f;
    unsigned int set;
    int rc, err;

    /* zones at all */
    rc = create_sentinels(h, ALL, 1);
    if (rc == -EOPNOTSUPP) {
        c->zones = 0;
        if (create_sentinels(h, BIT(A) | BIT(E), 0) < 0)
            return;
    } else if (rc < 0) {
        c->probe_errno = -rc;
        return;
    } else {
        c->zones = 1;
    }

    if (c->zones) {
        /* zone dump: zone 5 and, separately, zone 0 (fixed late in 6.8) */
        memset(&f, 0, sizeof(f));
        f.fields = PCT_F_ZONE;
        f.zone = 5;
        rc = raw_dump(h, &f, PCT_K_ZONE, &set);
        if (rc == 0 && set == (BIT(B) | BIT(D))) {
            f.zone = 0;
            rc = raw_dump(h, &f, PCT_K_ZONE, &set);
            c->dump_zone = rc == 0 && set == (BIT(A) | BIT(E));
        }
    }

    memset(&f, 0, sizeof(f));
    f.fields = PCT_F_MARK;
    f.mark = 2;
    f.mark_mask = 0xffffffff;
    rc = raw_dump(h, &f, PCT_K_MARK, &set);
    c->dump_mark = rc == 0 && set == (c->zones ? (BIT(B) | BIT(D) | BIT(F)) : 0);

    if (c->zones) {
        src_filter(&f, B);
        rc = raw_dump(h, &f, PCT_K_FAMILY | PCT_K_TUPLE_V4, &set);
        c->dump_filter_v4 = rc == 0 && set == BIT(B);
        src_filter(&f, D);
        rc = raw_dump(h, &f, PCT_K_FAMILY | PCT_K_TUPLE_V6, &set);
        c->dump_filter_v6 = rc == 0 && set == BIT(D);
        c->dump_filter_v6_inverted = rc == 0 && set == BIT(E);

        /* zone flush with family v4: zone 5, then zone 0. The table holds
         * all sentinels before each flush: survivors_then_reset puts back
         * what a flush took, and any failure there ends the flush tests
         * (a missing sentinel would pass for a working filter). */
        memset(&f, 0, sizeof(f));
        f.fields = PCT_F_ZONE | PCT_F_FAMILY;
        f.family = AF_INET;
        f.zone = 5;
        rc = pct_flush(h, &f);
        if ((err = survivors_then_reset(h, &set)) < 0)
            goto out;
        if (rc == 0 && (set == (ALL & ~BIT(B)) || set == (ALL & ~(BIT(B) | BIT(D))))) {
            int family_ok = set == (ALL & ~BIT(B));
            f.zone = 0;
            rc = pct_flush(h, &f);
            if ((err = survivors_then_reset(h, &set)) < 0)
                goto out;
            c->flush_zone = rc == 0 && (set == (ALL & ~BIT(A))
                                        || set == (ALL & ~(BIT(A) | BIT(E))));
            c->flush_family = c->flush_zone && family_ok && set == (ALL & ~BIT(A));
        }
        if (c->flush_zone && c->flush_family) {
            memset(&f, 0, sizeof(f));
            f.fields = PCT_F_ZONE | PCT_F_FAMILY | PCT_F_MARK;
            f.family = AF_INET;
            f.zone = 6;
            f.mark = 1;
            f.mark_mask = 0xffffffff;
            rc = pct_flush(h, &f);
            if ((err = survivors_then_reset(h, &set)) < 0)
                goto out;
            c->flush_mark = rc == 0 && set == (ALL & ~BIT(C));
        }
        c->flush_filter = flush_filter_ok(h);
    }
    c->probed = 1;
    return;
out:
    /* the flush tests not run stay false; the verdict is not cached */
    c->probe_errno = -err;
    c->probed = 1;
}

int pct_probe(struct pct_caps *caps)
{
    struct pct_handle *h = NULL;
    int saved, rc;

    memset(caps, 0, sizeof(*caps));
    saved = open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC);
    if (saved < 0)
        return -errno;
    if (unshare(CLONE_NEWNET) < 0) {
        rc = -errno;
        close(saved);
        return rc;
    }
    rc = pct_open(NULL, &h);
    /* back home before anything else: the sockets keep the scratch netns
     * alive until they are closed, then it goes away */
    if (pct_leave_netns(saved) < 0) {
        pct_close(h);
        return -EFAULT;
    }
    if (rc < 0)
        return rc;
    run_probe(h, caps);
    pct_close(h);
    return 0;
}
