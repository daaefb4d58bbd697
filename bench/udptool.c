/*
 * UDP load tools for bench/udp.ts, in C so that the load side stays cheap on a 2-core machine
 * shared by the client, the proxy and the backend (as wrk and iperf3 are for TCP).
 *
 *   udptool echo                       UDP echo on 127.0.0.1:0 (prints "READY PORT"); every
 *                                      datagram goes back to its sender, unchanged
 *   udptool load PORT FLOWS SECONDS SIZE
 *                                      FLOWS client sockets (one flow each) on 127.0.0.1, each in a
 *                                      closed loop: send SIZE bytes to 127.0.0.1:PORT, wait for the
 *                                      echo, repeat, for SECONDS. A datagram not answered in 200 ms
 *                                      counts as lost and is sent again, with the flow's next sequence
 *                                      number (a late or misdelivered reply is "stale", not a round
 *                                      trip). Prints one line of JSON: round trips, round trips/s,
 *                                      p50/p99/max latency in us, lost, stale
 *   udptool idle PORT N [DEADLINE_S]   N client sockets; each sends one datagram and waits for its
 *                                      echo (resending every 200 ms, for at most DEADLINE_S seconds,
 *                                      default 60), so that N flows are open; prints "READY served"
 *                                      and holds the sockets until stdin closes
 *
 * Every loop is bounded in time: load by SECONDS, idle by its deadline, echo by stdin (it exits
 * when the bench that started it goes away) and a 30 min hard limit.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static uint64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void die(const char *what) {
  perror(what);
  exit(2);
}

static struct sockaddr_in loopback(int port) {
  struct sockaddr_in a;
  memset(&a, 0, sizeof a);
  a.sin_family = AF_INET;
  a.sin_port = htons((uint16_t)port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  return a;
}

/* A client socket bound to 127.0.0.1:0 and connected to 127.0.0.1:port (replies from elsewhere are
 * filtered out by the kernel). */
static int client_socket(int port) {
  int fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) die("socket");
  struct sockaddr_in me = loopback(0);
  if (bind(fd, (struct sockaddr *)&me, sizeof me) < 0) die("bind");
  struct sockaddr_in to = loopback(port);
  if (connect(fd, (struct sockaddr *)&to, sizeof to) < 0) die("connect");
  return fd;
}

static int echo(void) {
  int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0) die("socket");
  int big = 4 << 20;
  setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &big, sizeof big);
  setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &big, sizeof big);
  struct sockaddr_in me = loopback(0);
  if (bind(fd, (struct sockaddr *)&me, sizeof me) < 0) die("bind");
  socklen_t len = sizeof me;
  getsockname(fd, (struct sockaddr *)&me, &len);
  printf("READY %d\n", ntohs(me.sin_port));
  fflush(stdout);
  alarm(1800);
  static char buf[65536];
  struct pollfd p[2] = {{.fd = fd, .events = POLLIN}, {.fd = 0, .events = POLLIN}};
  for (;;) {
    if (poll(p, 2, -1) < 0 && errno != EINTR) die("poll");
    if (p[1].revents) return 0; /* stdin closed: the bench is gone */
    if (!(p[0].revents & POLLIN)) continue;
    /* Drain what is queued, then poll again. */
    for (int i = 0; i < 256; i++) {
      struct sockaddr_in from;
      socklen_t fl = sizeof from;
      ssize_t n = recvfrom(fd, buf, sizeof buf, MSG_DONTWAIT, (struct sockaddr *)&from, &fl);
      if (n < 0) break;
      sendto(fd, buf, (size_t)n, 0, (struct sockaddr *)&from, fl);
    }
  }
}

#define HIST_US 1000000 /* latency histogram: 1 us buckets up to 1 s */
static uint32_t hist[HIST_US + 1];

static double percentile(uint64_t total, double p) {
  uint64_t want = (uint64_t)((p / 100.0) * (double)total);
  if (want == 0) want = 1;
  uint64_t seen = 0;
  for (int i = 0; i <= HIST_US; i++) {
    seen += hist[i];
    if (seen >= want) return i;
  }
  return HIST_US;
}

/* Each datagram carries its flow's sequence number: a reply to an earlier (resent) datagram,
 * or one that reached the wrong client, is not counted as a round trip. */
static void send_seq(int fd, char *payload, int size, uint64_t seq) {
  memcpy(payload, &seq, sizeof seq);
  send(fd, payload, (size_t)size, 0);
}

static int load(int port, int flows, double seconds, int size) {
  int *fds = calloc((size_t)flows, sizeof *fds);
  uint64_t *sent_at = calloc((size_t)flows, sizeof *sent_at);
  uint64_t *seq = calloc((size_t)flows, sizeof *seq);
  if (size < 8) size = 8;
  char *payload = malloc((size_t)size);
  static char buf[65536];
  if (!fds || !sent_at || !seq || !payload) die("calloc");
  memset(payload, 'u', (size_t)size);
  uint64_t stale = 0;
  int ep = epoll_create1(EPOLL_CLOEXEC);
  for (int i = 0; i < flows; i++) {
    fds[i] = client_socket(port);
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
    epoll_ctl(ep, EPOLL_CTL_ADD, fds[i], &ev);
  }
  uint64_t start = now_ns(), end = start + (uint64_t)(seconds * 1e9), rt = 0, lost = 0, max_us = 0;
  for (int i = 0; i < flows; i++) {
    sent_at[i] = now_ns();
    send_seq(fds[i], payload, size, seq[i]);
  }
  struct epoll_event evs[256];
  uint64_t last_check = start;
  for (;;) {
    uint64_t t = now_ns();
    if (t >= end) break;
    int n = epoll_wait(ep, evs, 256, 50);
    t = now_ns();
    for (int k = 0; k < n; k++) {
      int i = (int)evs[k].data.u32;
      ssize_t len;
      while ((len = recv(fds[i], buf, sizeof buf, 0)) >= 0) {
        uint64_t got = now_ns(), s_in;
        memcpy(&s_in, buf, sizeof s_in);
        if (len != size || s_in != seq[i]) {
          stale++;
          continue;
        }
        uint64_t us = (got - sent_at[i]) / 1000;
        hist[us > HIST_US ? HIST_US : us]++;
        if (us > max_us) max_us = us;
        rt++;
        sent_at[i] = now_ns();
        send_seq(fds[i], payload, size, ++seq[i]);
      }
    }
    t = now_ns();
    if (t - last_check > 50000000u) {
      last_check = t;
      for (int i = 0; i < flows; i++) {
        if (t > sent_at[i] + 200000000u) { /* lost on the way: send again */
          lost++;
          sent_at[i] = t;
          send_seq(fds[i], payload, size, ++seq[i]);
        }
      }
    }
  }
  double wall = (double)(now_ns() - start) / 1e9;
  printf("{\"roundTrips\":%llu,\"perSec\":%.1f,\"p50us\":%.0f,\"p99us\":%.0f,\"maxUs\":%llu,\"lost\":%llu,\"stale\":%llu}\n",
         (unsigned long long)rt, (double)rt / wall, percentile(rt, 50), percentile(rt, 99),
         (unsigned long long)max_us, (unsigned long long)lost, (unsigned long long)stale);
  return 0;
}

static int idle(int port, int count, double deadline_s) {
  int *fds = calloc((size_t)count, sizeof *fds);
  char *done = calloc((size_t)count, 1);
  struct pollfd *p = calloc((size_t)count, sizeof *p);
  if (!fds || !done || !p) die("calloc");
  uint64_t deadline = now_ns() + (uint64_t)(deadline_s * 1e9);
  int served = 0;
  /* Waves of 200, so that the proxy's and the backend's socket buffers are not overrun. */
  for (int w = 0; w < count; w += 200) {
    int m = count - w < 200 ? count - w : 200;
    for (int i = w; i < w + m; i++) {
      fds[i] = client_socket(port);
      send(fds[i], "idle!", 5, 0);
      p[i - w].fd = fds[i];
      p[i - w].events = POLLIN;
    }
    uint64_t resend = now_ns() + 200000000u;
    int left = m;
    while (left > 0 && now_ns() < deadline) {
      int n = poll(p, (nfds_t)m, 50);
      for (int k = 0; n > 0 && k < m; k++) {
        int i = w + k;
        if (!done[i] && (p[k].revents & POLLIN)) {
          char b[16];
          if (recv(fds[i], b, sizeof b, 0) >= 0) {
            done[i] = 1;
            p[k].fd = -p[k].fd - 1; /* no longer polled */
            served++;
            left--;
          }
        }
      }
      if (now_ns() > resend) {
        resend = now_ns() + 200000000u;
        for (int i = w; i < w + m; i++) if (!done[i]) send(fds[i], "idle!", 5, 0);
      }
    }
  }
  printf("READY %d\n", served);
  fflush(stdout);
  /* Hold every flow open until the bench closes our stdin (at most 5 minutes). */
  alarm(300);
  char c;
  while (read(0, &c, 1) > 0) {
  }
  return served == count ? 0 : 1;
}

int main(int argc, char **argv) {
  if (argc >= 2 && strcmp(argv[1], "echo") == 0) return echo();
  if (argc == 6 && strcmp(argv[1], "load") == 0) return load(atoi(argv[2]), atoi(argv[3]), atof(argv[4]), atoi(argv[5]));
  if ((argc == 4 || argc == 5) && strcmp(argv[1], "idle") == 0) return idle(atoi(argv[2]), atoi(argv[3]), argc == 5 ? atof(argv[4]) : 60);
  fprintf(stderr, "usage: udptool echo | load PORT FLOWS SECONDS SIZE | idle PORT N [DEADLINE_S]\n");
  return 2;
}
