/* SPDX-License-Identifier: Apache-2.0 */
/* Opening ctnetlink sockets inside a network namespace without leaving the
 * calling thread there: setns() in, create the sockets, setns() back. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>
#include <linux/netfilter/nfnetlink.h>

#include "pct.h"

int pct_enter_netns(const char *path, int *saved)
{
    int target, self, err;

    *saved = -1;
    target = open(path, O_RDONLY | O_CLOEXEC);
    if (target < 0)
        return -errno;
    self = open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC);
    if (self < 0) {
        err = -errno;
        close(target);
        return err;
    }
    if (setns(target, CLONE_NEWNET) < 0) {
        err = -errno;
        close(target);
        close(self);
        return err;
    }
    close(target);
    *saved = self;
    return 0;
}

int pct_leave_netns(int saved)
{
    int err = 0;

    if (saved < 0)
        return 0;
    if (setns(saved, CLONE_NEWNET) < 0)
        err = -errno;
    close(saved);
    return err;
}

/* A raw netlink socket of protocol opened inside netns_path (NULL: the
 * caller's namespace); the fd, or -errno. */
int pct_socket_in_netns(const char *netns_path, int protocol)
{
    int fd, err, saved = -1;

    if (netns_path) {
        err = pct_enter_netns(netns_path, &saved);
        if (err < 0)
            return err;
    }
    fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, protocol);
    err = fd < 0 ? -errno : 0;
    if (netns_path) {
        int err2 = pct_leave_netns(saved);
        if (!err)
            err = err2;
    }
    if (err < 0) {
        if (fd >= 0)
            close(fd);
        return err;
    }
    return fd;
}

static struct mnl_socket *open_socket(unsigned int *portid, int rcvbuf, int *err)
{
    struct mnl_socket *nl;
    int one = 1;

    nl = mnl_socket_open2(NETLINK_NETFILTER, SOCK_CLOEXEC);
    if (!nl) {
        *err = -errno;
        return NULL;
    }
    if (mnl_socket_bind(nl, 0, MNL_SOCKET_AUTOPID) < 0) {
        *err = -errno;
        mnl_socket_close(nl);
        return NULL;
    }
    /* Acks carry only the header of the failed request. */
    mnl_socket_setsockopt(nl, NETLINK_CAP_ACK, &one, sizeof(one));
    /* Room for a whole batch of acks; FORCE needs CAP_NET_ADMIN. */
    if (setsockopt(mnl_socket_get_fd(nl), SOL_SOCKET, SO_RCVBUFFORCE,
                   &rcvbuf, sizeof(rcvbuf)) < 0)
        setsockopt(mnl_socket_get_fd(nl), SOL_SOCKET, SO_RCVBUF,
                   &rcvbuf, sizeof(rcvbuf));
    *portid = mnl_socket_get_portid(nl);
    return nl;
}

int pct_open(const char *netns_path, struct pct_handle **out)
{
    struct pct_handle *h;
    int saved = -1, err = 0, leave_err;

    *out = NULL;
    h = calloc(1, sizeof(*h));
    if (!h)
        return -ENOMEM;
    h->rbuf = malloc(PCT_RBUF_SIZE);
    h->sbuf = calloc(1, PCT_SBUF_SIZE);   /* attribute padding: never uninitialised bytes */
    h->abuf = malloc(PCT_RBUF_SIZE);
    if (!h->rbuf || !h->sbuf || !h->abuf) {
        err = -ENOMEM;
        goto fail;
    }
    if (netns_path && netns_path[0]) {
        err = pct_enter_netns(netns_path, &saved);
        if (err)
            goto fail;
    }
    h->dump_nl = open_socket(&h->dump_portid, 1 << 20, &err);
    if (h->dump_nl)
        h->cmd_nl = open_socket(&h->cmd_portid, 8 << 20, &err);
    leave_err = pct_leave_netns(saved);
    if (!err && leave_err)
        err = leave_err;
    if (err)
        goto fail;
    h->seq = (unsigned int)getpid() << 8;
    h->owner = -1;
    *out = h;
    return 0;
fail:
    pct_close(h);
    return err;
}

void pct_close(struct pct_handle *h)
{
    if (!h)
        return;
    if (h->dump_nl)
        mnl_socket_close(h->dump_nl);
    if (h->cmd_nl)
        mnl_socket_close(h->cmd_nl);
    free(h->rbuf);
    free(h->sbuf);
    free(h->abuf);
    free(h);
}
