/* SPDX-License-Identifier: Apache-2.0 */
/* Streamed dumps: one request, then entries handed out in batches. */
#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <linux/netfilter/nfnetlink.h>
#include <linux/netfilter/nfnetlink_conntrack.h>

#include "pct.h"

int pct_dump_start(struct pct_handle *h, const struct pct_filter *f, unsigned int kflags)
{
    char buf[MNL_SOCKET_BUFFER_SIZE];
    memset(buf, 0, MNL_SOCKET_BUFFER_SIZE);  /* never send uninitialised padding */
    struct nlmsghdr *nlh;
    unsigned char family = 0;

    if (h->dumping)
        pct_dump_abort(h);
    if ((f->fields & PCT_F_FAMILY) && (kflags & PCT_K_FAMILY))
        family = f->family;
    h->dump_seq = ++h->seq;
    nlh = pct_put_request(buf, IPCTNL_MSG_CT_GET, NLM_F_DUMP, family, 0, h->dump_seq);
    pct_put_kernel_filter(nlh, f, kflags);
    if (mnl_socket_sendto(h->dump_nl, nlh, nlh->nlmsg_len) < 0)
        return -errno;
    h->dump_filter = *f;
    h->dumping = 1;
    h->rleft = 0;
    h->rcur = NULL;
    return 0;
}

/* Next message of the running dump: 1 with *out set, 0 at the end, -errno. */
int pct_next_msg(struct pct_handle *h, const struct nlmsghdr **out)
{
    for (;;) {
        ssize_t n;

        while (h->rleft > 0 && mnl_nlmsg_ok(h->rcur, h->rleft)) {
            const struct nlmsghdr *nlh = h->rcur;

            h->rcur = mnl_nlmsg_next(nlh, &h->rleft);
            if (nlh->nlmsg_seq != h->dump_seq)
                continue;   /* left over from an aborted request */
            if (nlh->nlmsg_type == NLMSG_DONE) {
                const int *rc = mnl_nlmsg_get_payload(nlh);
                h->dumping = 0;
                h->rleft = 0;
                if (nlh->nlmsg_len >= NLMSG_HDRLEN + sizeof(int) && *rc < 0)
                    return *rc;
                return 0;
            }
            if (nlh->nlmsg_type == NLMSG_ERROR) {
                const struct nlmsgerr *e = mnl_nlmsg_get_payload(nlh);
                if (e->error) {
                    h->dumping = 0;
                    h->rleft = 0;
                    return e->error;
                }
                continue;
            }
            if ((nlh->nlmsg_type & 0xff) != IPCTNL_MSG_CT_NEW)
                continue;
            *out = nlh;
            return 1;
        }
        if (!h->dumping)
            return 0;
        n = recv(mnl_socket_get_fd(h->dump_nl), h->rbuf, PCT_RBUF_SIZE, 0);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            h->dumping = 0;
            return -errno;
        }
        if (n == 0) {
            h->dumping = 0;
            return -EIO;
        }
        h->rcur = (const struct nlmsghdr *)h->rbuf;
        h->rleft = (int)n;
    }
}

int pct_dump_next(struct pct_handle *h, struct pct_entry *out, int max)
{
    const struct nlmsghdr *nlh;
    const struct nlattr *orig;
    int n = 0, rc;

    while (n < max) {
        rc = pct_next_msg(h, &nlh);
        if (rc < 0)
            return rc;
        if (rc == 0)
            break;
        if (pct_parse_entry(nlh, &out[n], &orig) < 0)
            continue;
        if (pct_match(&h->dump_filter, &out[n]))
            n++;
    }
    return n;
}

/* Read the rest of a dump we no longer want: the kernel refuses a new dump
 * on a socket whose previous one has not ended. */
void pct_dump_abort(struct pct_handle *h)
{
    const struct nlmsghdr *nlh;

    while (h->dumping && pct_next_msg(h, &nlh) > 0)
        ;
    h->dumping = 0;
    h->rleft = 0;
}

long long pct_count(struct pct_handle *h, const struct pct_filter *f, unsigned int kflags)
{
    const struct nlmsghdr *nlh;
    const struct nlattr *orig;
    struct pct_entry e;
    long long n = 0;
    int rc;

    rc = pct_dump_start(h, f, kflags);
    if (rc < 0)
        return rc;
    while ((rc = pct_next_msg(h, &nlh)) > 0) {
        if (pct_parse_entry(nlh, &e, &orig) == 0 && pct_match(f, &e))
            n++;
    }
    return rc < 0 ? rc : n;
}
