// floor-uring: floor.c's relay on io_uring instead of epoll, to measure what a
// completion-based loop would take off the floor. Same relay, same traffic assumptions (read
// floor.c first): per request it receives from the client, sends to the backend, receives from
// the backend and sends to the client; it parses nothing but the reply's Content-Length,
// chooses backends in turn, trusts the benchmark's traffic and drops a connection on any error.
// As in floor.c, a client connection keeps its backend connection while it lives, and a
// `Connection: close` request has its header renamed in place (`Xonnection`), gets
// `Connection: close` added to the reply (one sendmsg of three pieces), then its client
// connection is closed and the backend connection goes back to a free list.
//
// What changes is how the system calls are made. One thread, one ring, one io_uring_enter per
// loop (submit everything queued, wait for at least one completion):
// - the listener has one multishot accept; every socket (client or backend) one multishot recv
//   into a ring of provided buffers, armed once for the connection's life;
// - a received buffer is sent on as it is (send with MSG_DONTWAIT: done at submission or failed,
//   as floor.c's non-blocking write, so nothing is reordered) and returned to the buffer ring
//   when the send completes;
// - closing cancels the socket's multishot recv (which holds a reference to the socket) then
//   closes it, both in the ring with no completion unless they fail;
// - the ring is single-issuer with deferred task work (completions run when the loop waits),
//   and its own descriptor is registered. No SQPOLL (it would spend a second CPU), no fixed
//   files for the sockets (the fget/fput they would save are under 1 % of the samples). New
//   backend connections (a few per run) use socket and connect.
// Completions carry the socket, a generation (stale ones, for a socket closed since, are
// ignored) and the buffer.
//
//   cc -O2 -o floor-uring floor_uring.c -luring && ./floor-uring LISTEN_PORT BACKEND_PORT...
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <liburing.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#define MAX_FD 65536
#define BUF 16384
// Provided buffers: the ring hands them out in turn, so each is reused only every NBUF
// receives. 128 is twice what the benchmark's 64 connections can have in flight and keeps the
// receive copies in cache (with 1024, _copy_to_iter took 1.7x the share of samples).
#define NBUF 128

struct conn {
    int peer;      // the other side's fd, or -1
    int client;    // 1 for a client connection, 0 for a backend connection
    int close_after;
    unsigned gen;   // bumped on close: completions of an older socket on this fd are ignored
    long remaining; // reply bytes still expected (backend side); -1: head not yet seen
    struct iovec iov[3]; // the close reply's pieces (client side), read at submission
    struct msghdr msg;
};

enum { OP_ACCEPT, OP_RECV, OP_SEND, OP_NONE };
// user_data: op (4 bits) | buffer id (20) | generation (16) | fd (24)
#define TAG(op, fd, bid) \
    ((unsigned long long)(op) << 60 | (unsigned long long)(bid) << 40 | \
     (unsigned long long)(conns[fd].gen & 0xffff) << 24 | (unsigned)(fd))
#define TAG_OP(t) ((int)((t) >> 60))
#define TAG_BID(t) ((int)((t) >> 40 & 0xfffff))
#define TAG_GEN(t) ((unsigned)((t) >> 24 & 0xffff))
#define TAG_FD(t) ((int)((t) & 0xffffff))

static struct conn conns[MAX_FD];
static int free_backends[MAX_FD];
static int n_free;
static struct sockaddr_in backends[16];
static int n_backends, next_backend;
static struct io_uring ring;
static struct io_uring_buf_ring *br;
static char *bufs;
static int returned; // buffers given back since the last io_uring_buf_ring_advance
static int lfd;

static struct io_uring_sqe *sqe(void) {
    struct io_uring_sqe *s = io_uring_get_sqe(&ring);
    while (!s) { // the submission queue is full: submit what is there
        io_uring_submit(&ring);
        s = io_uring_get_sqe(&ring);
    }
    return s;
}

static void give_back(int bid) {
    io_uring_buf_ring_add(br, bufs + (size_t)bid * BUF, BUF, bid, io_uring_buf_ring_mask(NBUF),
                          returned++);
}

static void arm_accept(void) {
    struct io_uring_sqe *s = sqe();
    io_uring_prep_multishot_accept(s, lfd, NULL, NULL, 0);
    io_uring_sqe_set_data64(s, (unsigned long long)OP_ACCEPT << 60);
}

static void arm_recv(int fd) {
    struct io_uring_sqe *s = sqe();
    io_uring_prep_recv_multishot(s, fd, NULL, 0, 0);
    s->flags |= IOSQE_BUFFER_SELECT;
    s->buf_group = 0;
    io_uring_sqe_set_data64(s, TAG(OP_RECV, fd, 0));
}

// A send whose completion names `owner` (the client: a failure drops it and its backend).
static void send_buf(int fd, const char *p, long n, int owner, int bid) {
    struct io_uring_sqe *s = sqe();
    io_uring_prep_send(s, fd, p, n, MSG_DONTWAIT);
    io_uring_sqe_set_data64(s, TAG(OP_SEND, owner, bid));
}

static void finish(int fd) { // cancel the socket's recv (by its tag: one hash lookup), close it
    struct io_uring_sqe *s = sqe();
    io_uring_prep_cancel64(s, TAG(OP_RECV, fd, 0), 0);
    s->flags |= IOSQE_CQE_SKIP_SUCCESS;
    io_uring_sqe_set_data64(s, (unsigned long long)OP_NONE << 60);
    s = sqe();
    io_uring_prep_close(s, fd);
    s->flags |= IOSQE_CQE_SKIP_SUCCESS;
    io_uring_sqe_set_data64(s, (unsigned long long)OP_NONE << 60);
    conns[fd].gen++;
    conns[fd].peer = -1;
    conns[fd].close_after = 0;
}

static void reset(int fd, int client) {
    conns[fd] = (struct conn){.peer = -1, .client = client, .gen = conns[fd].gen};
}

static int backend_fd(void) {
    if (n_free > 0) return free_backends[--n_free];
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0 || fd >= MAX_FD) return -1;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    // Loopback: the handshake completes inside connect().
    if (connect(fd, (struct sockaddr *)&backends[next_backend], sizeof backends[0]) < 0) {
        close(fd);
        return -1;
    }
    next_backend = (next_backend + 1) % n_backends;
    reset(fd, 0);
    arm_recv(fd);
    return fd;
}

static void drop(int fd) {
    int peer = conns[fd].peer;
    finish(fd);
    if (peer >= 0) {
        conns[peer].peer = -1;
        finish(peer);
    }
}

// Reply bytes in this read: head (up to the blank line) plus Content-Length, counted down.
static long reply_bytes(const char *p, long n) {
    const char *end = memmem(p, n, "\r\n\r\n", 4);
    if (!end) return -1;
    const char *cl = memmem(p, end - p, "\r\nContent-Length:", 17);
    if (!cl) cl = memmem(p, end - p, "\r\ncontent-length:", 17);
    long body = cl ? strtol(cl + 17, NULL, 10) : 0;
    return (end + 4 - p) + body;
}

static void from_client(int fd, char *buf, long n, int bid) {
    if (n <= 0) {
        int b = conns[fd].peer;
        if (b >= 0 && conns[b].remaining <= 0) { // between requests: keep the backend
            conns[b].peer = -1;
            free_backends[n_free++] = b;
            finish(fd);
            return;
        }
        drop(fd);
        return;
    }
    struct conn *c = &conns[fd];
    char *close_hdr = memmem(buf, n, "\r\nConnection: close\r\n", 21);
    if (close_hdr) {
        close_hdr[2] = 'X';
        c->close_after = 1;
    }
    if (c->peer < 0) {
        int b = backend_fd();
        if (b < 0) {
            give_back(bid);
            drop(fd);
            return;
        }
        c->peer = b;
        conns[b].peer = fd;
    }
    conns[c->peer].remaining = -1;
    send_buf(c->peer, buf, n, fd, bid);
}

static void from_backend(int fd, char *buf, long n, int bid) {
    struct conn *b = &conns[fd];
    int client = b->peer;
    if (client < 0) { // an idle pooled connection spoke: the backend closed it
        if (n > 0) give_back(bid);
        for (int i = 0; i < n_free; i++)
            if (free_backends[i] == fd) free_backends[i] = free_backends[--n_free];
        finish(fd);
        return;
    }
    if (n <= 0) {
        drop(fd);
        return;
    }
    struct conn *c = &conns[client];
    char *eol = b->remaining < 0 ? memmem(buf, n, "\r\n", 2) : NULL;
    if (b->remaining < 0) b->remaining = reply_bytes(buf, n);
    if (c->close_after && eol) { // say so in the reply, after the status line
        static char close_hdr[] = "Connection: close\r\n";
        c->iov[0] = (struct iovec){buf, eol + 2 - buf};
        c->iov[1] = (struct iovec){close_hdr, sizeof close_hdr - 1};
        c->iov[2] = (struct iovec){eol + 2, n - (eol + 2 - buf)};
        c->msg = (struct msghdr){.msg_iov = c->iov, .msg_iovlen = 3};
        struct io_uring_sqe *s = sqe();
        io_uring_prep_sendmsg(s, client, &c->msg, MSG_DONTWAIT);
        io_uring_sqe_set_data64(s, TAG(OP_SEND, client, bid));
    } else {
        send_buf(client, buf, n, client, bid);
    }
    b->remaining -= n;
    if (b->remaining <= 0 && c->close_after) { // queued after the send: it goes out first
        finish(client);
        b->peer = -1;
        free_backends[n_free++] = fd;
    }
}

static void complete(struct io_uring_cqe *cqe) {
    unsigned long long t = cqe->user_data;
    int fd = TAG_FD(t), res = cqe->res, more = cqe->flags & IORING_CQE_F_MORE;
    switch (TAG_OP(t)) {
    case OP_ACCEPT:
        if (!more) arm_accept();
        if (res < 0) return;
        if (res >= MAX_FD) {
            close(res);
            return;
        }
        reset(res, 1);
        arm_recv(res);
        return;
    case OP_RECV: {
        int bid = cqe->flags & IORING_CQE_F_BUFFER ? (int)(cqe->flags >> IORING_CQE_BUFFER_SHIFT)
                                                   : -1;
        if (TAG_GEN(t) != (conns[fd].gen & 0xffff)) { // closed since
            if (bid >= 0) give_back(bid);
            return;
        }
        if (res == -ENOBUFS) { // all buffers in flight: they come back with this loop's sends
            arm_recv(fd);
            return;
        }
        unsigned gen = conns[fd].gen;
        char *buf = bid >= 0 ? bufs + (size_t)bid * BUF : NULL;
        if (conns[fd].client)
            from_client(fd, buf, res, bid);
        else
            from_backend(fd, buf, res, bid);
        if (res > 0 && !more && conns[fd].gen == gen) arm_recv(fd); // the kernel ended it
        return;
    }
    case OP_SEND:
        give_back(TAG_BID(t));
        if (res < 0 && TAG_GEN(t) == (conns[fd].gen & 0xffff)) drop(fd);
        return;
    default: // a failed cancel (the recv had ended) or close: nothing to do
        return;
    }
}

int main(int argc, char **argv) {
    if (argc < 3 || argc - 2 > 16) {
        fprintf(stderr, "usage: %s LISTEN_PORT BACKEND_PORT...\n", argv[0]);
        return 2;
    }
    for (int i = 2; i < argc; i++) {
        backends[n_backends].sin_family = AF_INET;
        backends[n_backends].sin_port = htons(atoi(argv[i]));
        backends[n_backends].sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        n_backends++;
    }
    lfd = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    setsockopt(lfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1])),
                               .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (bind(lfd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(lfd, 4096) < 0) {
        perror("floor-uring: listen");
        return 1;
    }
    struct io_uring_params params = {
        .flags = IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN};
    int err = io_uring_queue_init_params(4096, &ring, &params);
    if (err < 0) {
        fprintf(stderr, "floor-uring: io_uring_queue_init: %s\n", strerror(-err));
        return 1;
    }
    io_uring_register_ring_fd(&ring);
    if (posix_memalign((void **)&br, 4096, NBUF * sizeof(struct io_uring_buf)) ||
        posix_memalign((void **)&bufs, 4096, (size_t)NBUF * BUF)) {
        perror("floor-uring: buffers");
        return 1;
    }
    struct io_uring_buf_reg reg = {.ring_addr = (unsigned long)br, .ring_entries = NBUF};
    if ((err = io_uring_register_buf_ring(&ring, &reg, 0)) < 0) {
        fprintf(stderr, "floor-uring: io_uring_register_buf_ring: %s\n", strerror(-err));
        return 1;
    }
    io_uring_buf_ring_init(br);
    for (int i = 0; i < NBUF; i++) give_back(i);
    arm_accept();
    for (;;) {
        io_uring_buf_ring_advance(br, returned);
        returned = 0;
        io_uring_submit_and_wait(&ring, 1);
        struct io_uring_cqe *cqe;
        unsigned head, seen = 0;
        io_uring_for_each_cqe(&ring, head, cqe) {
            complete(cqe);
            seen++;
        }
        io_uring_cq_advance(&ring, seen);
    }
}
