// floor: the cheapest HTTP/1.1 relay the e2e benchmark's plain-HTTP variants allow, as a
// yardstick, not a proxy. It does only the system calls any user-space proxy must make for a
// request (read the client, write the backend, read the backend, write the client, plus one
// epoll_wait for many events) and nothing else: no header parsing beyond finding the reply's
// end, no affinity (backends in turn per new backend connection), no forwarded headers, no
// timeouts, no error handling beyond dropping the connection. It trusts the benchmark's
// traffic: small requests that arrive in one read, replies with Content-Length.
//
// A client connection keeps the backend connection it was given while it lives (no pool
// operation per request); a `Connection: close` request gets the reply, then its client
// connection is closed and the backend connection goes back to a free list. The header is
// renamed in place (`Xonnection`) so the backend keeps its connection open, as the proxies'
// pooled backend connections do, and `Connection: close` is added to the reply (one writev).
//
//   cc -O2 -o floor floor.c && ./floor LISTEN_PORT BACKEND_PORT...
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#define MAX_FD 65536
#define BUF 16384

struct conn {
    int peer;      // the other side's fd, or -1
    int client;    // 1 for a client connection, 0 for a backend connection
    int close_after;
    long remaining; // reply bytes still expected (backend side); -1: head not yet seen
};

static struct conn conns[MAX_FD];
static int free_backends[MAX_FD];
static int n_free;
static struct sockaddr_in backends[16];
static int n_backends, next_backend;
static int ep;
static char buf[BUF];

static void watch(int fd) {
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = fd};
    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
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
    fcntl(fd, F_SETFL, O_NONBLOCK);
    conns[fd] = (struct conn){.peer = -1, .client = 0, .remaining = 0};
    watch(fd);
    return fd;
}

static void drop(int fd) {
    int peer = conns[fd].peer;
    close(fd);
    conns[fd].peer = -1;
    if (peer >= 0) {
        conns[peer].peer = -1;
        close(peer);
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

static void from_client(int fd) {
    ssize_t n = read(fd, buf, BUF);
    if (n <= 0) {
        if (n < 0 && errno == EAGAIN) return;
        int b = conns[fd].peer;
        if (b >= 0 && conns[b].remaining <= 0) { // between requests: keep the backend
            conns[b].peer = -1;
            free_backends[n_free++] = b;
            conns[fd] = (struct conn){.peer = -1};
            close(fd);
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
            drop(fd);
            return;
        }
        c->peer = b;
        conns[b].peer = fd;
    }
    conns[c->peer].remaining = -1;
    if (write(c->peer, buf, n) != n) drop(fd);
}

static void from_backend(int fd) {
    ssize_t n = read(fd, buf, BUF);
    if (n < 0 && errno == EAGAIN) return;
    struct conn *b = &conns[fd];
    int client = b->peer;
    if (client < 0) { // an idle pooled connection spoke: the backend closed it
        for (int i = 0; i < n_free; i++)
            if (free_backends[i] == fd) free_backends[i] = free_backends[--n_free];
        close(fd);
        return;
    }
    if (n <= 0) {
        drop(fd);
        return;
    }
    ssize_t sent, want = n;
    if (b->remaining < 0) {
        b->remaining = reply_bytes(buf, n);
        char *eol = memmem(buf, n, "\r\n", 2);
        if (conns[client].close_after && eol) { // say so in the reply, after the status line
            static char close_hdr[] = "Connection: close\r\n";
            struct iovec iov[3] = {{buf, eol + 2 - buf},
                                   {close_hdr, sizeof close_hdr - 1},
                                   {eol + 2, n - (eol + 2 - buf)}};
            want += sizeof close_hdr - 1;
            sent = writev(client, iov, 3);
        } else {
            sent = write(client, buf, n);
        }
    } else {
        sent = write(client, buf, n);
    }
    b->remaining -= n;
    if (sent != want) {
        drop(fd);
        return;
    }
    if (b->remaining <= 0 && conns[client].close_after) {
        conns[client] = (struct conn){.peer = -1};
        close(client);
        b->peer = -1;
        free_backends[n_free++] = fd;
    }
}

int main(int argc, char **argv) {
    if (argc < 3 || argc - 2 > 16) {
        fprintf(stderr, "usage: %s LISTEN_PORT BACKEND_PORT...\n", argv[0]);
        return 2;
    }
    // A client that resets its connection must not end the relay mid-run.
    signal(SIGPIPE, SIG_IGN);
    for (int i = 2; i < argc; i++) {
        backends[n_backends].sin_family = AF_INET;
        backends[n_backends].sin_port = htons(atoi(argv[i]));
        backends[n_backends].sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        n_backends++;
    }
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    setsockopt(lfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1])),
                               .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (bind(lfd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(lfd, 4096) < 0) {
        perror("floor: listen");
        return 1;
    }
    ep = epoll_create1(0);
    watch(lfd);
    struct epoll_event events[256];
    for (;;) {
        int n = epoll_wait(ep, events, 256, -1);
        for (int i = 0; i < n; i++) {
            int fd = events[i].data.fd;
            if (fd == lfd) {
                for (;;) {
                    int c = accept4(lfd, NULL, NULL, SOCK_NONBLOCK);
                    if (c < 0) break;
                    if (c >= MAX_FD) {
                        close(c);
                        continue;
                    }
                    conns[c] = (struct conn){.peer = -1, .client = 1};
                    watch(c);
                }
            } else if (conns[fd].client) {
                from_client(fd);
            } else {
                from_backend(fd);
            }
        }
    }
}
