/*
 * The benchmark's floor peer: the least a CONNECT relay of egress's shape can do per byte. One
 * thread, one epoll loop (edge-triggered), and per connection two pipes that bytes move through
 * by non-blocking splice(2), as in egress's relay; no policy, no logging, no allocation while
 * relaying. It accepts on LISTEN and opens `CONNECT TARGET` with Basic credentials through
 * PROXY (blocking: the bulk runs it is measured in open few connections). What it costs per GiB
 * is what the kernel's work costs anyway; egress's relay is measured against it in the same run.
 *
 *   egress-floor-relay LISTEN_IP LISTEN_PORT PROXY_IP PROXY_PORT TARGET BASIC_CREDENTIALS
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

/* As egress's relay: pipes of 256 KiB, and splices of up to that much. */
#define CHUNK (1 << 18)

static struct sockaddr_in proxy;
static char request[1024];

/* Direction 0: client to upstream; 1: upstream to client. */
struct conn {
    int fd[2];
    int pipe[2][2];
    size_t held[2];
    int eof[2], done[2];
    /* Closed in this batch of events: freed after it (a later event may name it too). */
    int dead;
};

/* Reads the proxy's answer head byte by byte (nothing of the tunnel is read past it). */
static int connect_answer_ok(int fd) {
    char head[4096];
    size_t len = 0;
    while (len < sizeof head - 1) {
        if (read(fd, head + len, 1) != 1)
            return 0;
        len++;
        if (len >= 4 && memcmp(head + len - 4, "\r\n\r\n", 4) == 0)
            return strncmp(head + 8, " 200", 4) == 0;
    }
    return 0;
}

/* Moves what it can in direction d without waiting; -1 on an error. */
static int pump(struct conn *c, int d) {
    int src = c->fd[d], dst = c->fd[1 - d];
    while (!c->done[d]) {
        if (c->held[d] > 0) {
            ssize_t n = splice(c->pipe[d][0], NULL, dst, NULL, c->held[d], SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
            if (n < 0)
                return errno == EAGAIN ? 0 : -1;
            c->held[d] -= n;
            continue;
        }
        if (c->eof[d]) {
            shutdown(dst, SHUT_WR);
            c->done[d] = 1;
            break;
        }
        ssize_t n = splice(src, NULL, c->pipe[d][1], NULL, CHUNK, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
        if (n < 0)
            return errno == EAGAIN ? 0 : -1;
        if (n == 0)
            c->eof[d] = 1;
        c->held[d] = n;
    }
    return 0;
}

static void finish(struct conn *c) {
    for (int i = 0; i < 2; i++) {
        close(c->fd[i]);
        close(c->pipe[i][0]);
        close(c->pipe[i][1]);
    }
    c->dead = 1;
}

static struct conn *open_tunnel(int client) {
    int one = 1;
    int upstream = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (upstream < 0)
        return NULL;
    setsockopt(upstream, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(client, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    size_t len = strlen(request);
    struct conn *c = calloc(1, sizeof *c);
    if (c && connect(upstream, (struct sockaddr *)&proxy, sizeof proxy) == 0 &&
        write(upstream, request, len) == (ssize_t)len && connect_answer_ok(upstream) &&
        pipe2(c->pipe[0], O_CLOEXEC | O_NONBLOCK) == 0) {
        if (pipe2(c->pipe[1], O_CLOEXEC | O_NONBLOCK) == 0) {
            for (int d = 0; d < 2; d++)
                fcntl(c->pipe[d][1], F_SETPIPE_SZ, CHUNK);
            c->fd[0] = client;
            c->fd[1] = upstream;
            fcntl(client, F_SETFL, O_NONBLOCK);
            fcntl(upstream, F_SETFL, O_NONBLOCK);
            return c;
        }
        close(c->pipe[0][0]);
        close(c->pipe[0][1]);
    }
    free(c);
    close(upstream);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 7) {
        fprintf(stderr, "usage: %s LISTEN_IP LISTEN_PORT PROXY_IP PROXY_PORT TARGET BASIC_CREDENTIALS\n", argv[0]);
        return 2;
    }
    struct sockaddr_in listen_addr = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    proxy = (struct sockaddr_in){.sin_family = AF_INET, .sin_port = htons(atoi(argv[4]))};
    if (inet_pton(AF_INET, argv[1], &listen_addr.sin_addr) != 1 || inet_pton(AF_INET, argv[3], &proxy.sin_addr) != 1) {
        fprintf(stderr, "bad address\n");
        return 2;
    }
    snprintf(request, sizeof request, "CONNECT %s HTTP/1.1\r\nHost: %s\r\nProxy-Authorization: Basic %s\r\n\r\n",
             argv[5], argv[5], argv[6]);
    int one = 1;
    int listener = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(listener, (struct sockaddr *)&listen_addr, sizeof listen_addr) != 0 || listen(listener, 1024) != 0) {
        perror("listen");
        return 1;
    }
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, listener, &ev);
    struct epoll_event events[64];
    for (;;) {
        int n = epoll_wait(ep, events, 64, -1);
        struct conn *dead[64];
        int ndead = 0;
        for (int i = 0; i < n; i++) {
            struct conn *c = events[i].data.ptr;
            if (c != NULL && c->dead)
                continue;
            if (c == NULL) {
                int client = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
                if (client < 0)
                    continue;
                c = open_tunnel(client);
                if (c == NULL) {
                    close(client);
                    continue;
                }
                for (int side = 0; side < 2; side++) {
                    struct epoll_event e = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, .data.ptr = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, c->fd[side], &e);
                }
            }
            /* Both directions on any event of either socket: edge-triggered, so each runs
             * until the kernel says EAGAIN. */
            if (pump(c, 0) < 0 || pump(c, 1) < 0 || (c->done[0] && c->done[1])) {
                finish(c);
                dead[ndead++] = c;
            }
        }
        for (int i = 0; i < ndead; i++)
            free(dead[i]);
    }
}
