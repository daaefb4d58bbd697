/*
 * udp_flows.c -- the data path of established UDP flows, in C (src/engine/datagram.ts).
 *
 * Why this exists: Node's UDP receive path costs about 5 us per datagram on top of
 * the kernel's work (libuv allocates 64 KiB per datagram, UDPWrap builds a Buffer and
 * an address object, and each datagram is a call from C++ into JavaScript): that was
 * the whole gap to nginx's stream module (bench/ANALYSIS.md, benchmark 10). Here a
 * datagram of an established flow never reaches JavaScript: it is read with
 * recvmmsg() (a batch per wakeup) into buffers of ours and sent on with send() or
 * sendmmsg(), by libuv poll handles on the proxy's own event loop.
 *
 * What stays in JavaScript: all policy. A datagram from a client address with no
 * flow (a miss) is handed to JS, which applies the connection cap, resolves the
 * target, logs, and asks us to open the flow (open) and send the first datagram
 * (send). JS's coarse sweep asks us to end the flows idle for too long (sweep); a
 * flow whose target answers with an ICMP error is ended here and reported (onEnd).
 * Byte counters are kept here and read when JS produces status or metrics (stats).
 *
 * Memory stays bounded without queues: a send the kernel does not take at once
 * (EAGAIN, ENOBUFS) is dropped, as the network would. The receive buffers (32 x
 * 64 KiB) are allocated once per Node environment; only the pages datagrams touch
 * become resident.
 *
 * ABI: N-API (NAPI_VERSION 8) for everything JavaScript sees, plus libuv's stable
 * 1.x ABI for the poll handles (uv_poll_t's size has not changed in 1.x), both
 * resolved against the node executable at load time. State is per environment
 * (napi_set_instance_data), so worker threads each get their own.
 *
 * Exports (l is what listen() returned; ids are flow ids, integers in 1 .. 2^53 - 1):
 *   listen(fd, receiver, onMiss, onEnd) -> l | -errno   (takes a copy of fd: dup)
 *   start(l), stop(l)                    -> 0 | -errno   (read the socket, or not: a drain)
 *   open(l, clientSockaddr, host, port, ipv6, nowMs) -> id | -errno
 *   send(l, id, datagram)                -> 0 (sent or dropped) | -errno (the flow is broken)
 *   close(l, id)                         end a flow (no report)
 *   sweep(l, nowMs, limitMs)             -> ids of the flows ended for idleness ([] if none)
 *   stats(l)                             -> [bytesToBackend, bytesToClient, datagramsToBackend,
 *                                            datagramsToClient] since the last call
 *   closeListener(l)                     end every flow (no reports) and close the socket
 * Callbacks, called with `receiver` as this:
 *   onMiss(address, port, clientSockaddr: Uint8Array, datagram: Uint8Array)
 *   onEnd(id, -errno)                    a flow ended by an error (ECONNREFUSED: ICMP)
 */
#define NAPI_VERSION 8
#include <node_api.h>
#include <uv.h>

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <net/if.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <unistd.h>

/* Datagrams per recvmmsg() call, and calls per wakeup before other handles get a turn. */
#define VLEN 32
#define MAX_BATCHES 4
/* Every UDP payload fits (65,507 bytes over IPv4, 65,527 over IPv6). */
#define SLOT 65536

typedef struct flow_key {
  uint16_t family; /* 4 or 6 */
  uint16_t port;   /* network order */
  uint32_t scope;
  uint8_t addr[16];
} flow_key;

typedef struct state state_t;
typedef struct listener listener_t;

typedef struct flow {
  uv_poll_t poll; /* poll.data = the flow */
  listener_t *l;
  struct flow *hnext; /* hash chain */
  flow_key key;
  struct sockaddr_in6 client; /* sockaddr_in for an IPv4 socket; clen says which */
  socklen_t clen;
  int fd;
  uint64_t id; /* see take_id */
  double last; /* the listener's clock when a datagram last passed, either way */
} flow_t;

struct listener {
  uv_poll_t poll;
  state_t *st;
  listener_t *next, *prev; /* the environment's open listeners */
  int fd;
  int reading;        /* poll started (not stopped by a drain) */
  int closing;        /* closeListener() was called: no more JS calls */
  int handle_closed;  /* uv_close() finished */
  int finalized;      /* the JS external is gone */
  napi_ref receiver, on_miss, on_end;
  napi_async_context actx;
  flow_t **buckets;
  uint32_t nbuckets, count;
  uint64_t seed;
  double stamp; /* JS's sweep clock (ms), set by open() and sweep(): no clock read per datagram */
  uint64_t bytes_out, bytes_back, dgrams_out, dgrams_back;
};

struct state {
  napi_env env;
  uv_loop_t *loop;
  listener_t *listeners;
  unsigned char *pool; /* VLEN * SLOT bytes, allocated on the first listen() */
  /*
   * Two sets of headers over the same buffers, set up once (prepare_all): one to read
   * client datagrams with their addresses, one to read a flow's and send them on. A
   * call restores only the entries the previous one changed.
   */
  struct mmsghdr lmsgs[VLEN], fmsgs[VLEN];
  struct iovec liov[VLEN], fiov[VLEN];
  struct sockaddr_in6 names[VLEN];
  int ldirty; /* lmsgs[0..ldirty) have a msg_namelen the kernel wrote */
  flow_t **slots;    /* slot index -> flow (NULL: free) */
  uint32_t *gens;    /* slot index -> the generation its next (or current) flow gets */
  uint32_t nslots, cap_slots;
  uint32_t *free_ids; /* free slot indexes */
  uint32_t nfree;
};

/* ---- flow table ---------------------------------------------------------------- */

static void make_key(const struct sockaddr *sa, flow_key *k) {
  memset(k, 0, sizeof(*k));
  if (sa->sa_family == AF_INET) {
    const struct sockaddr_in *s4 = (const struct sockaddr_in *)sa;
    k->family = 4;
    k->port = s4->sin_port;
    memcpy(k->addr, &s4->sin_addr, 4);
  } else {
    const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)sa;
    k->family = 6;
    k->port = s6->sin6_port;
    k->scope = s6->sin6_scope_id;
    memcpy(k->addr, &s6->sin6_addr, 16);
  }
}

/*
 * Seeded per listener from getrandom(): client addresses and ports are chosen by
 * the senders, so the bucket must not be predictable (the flow count is capped by
 * --connections-max anyway, and chains stay short by resizing).
 */
static uint32_t hash_key(const listener_t *l, const flow_key *k) {
  uint64_t w[3];
  memcpy(w, k, sizeof(w));
  uint64_t h = l->seed;
  for (int i = 0; i < 3; i++) {
    h ^= w[i];
    h *= 0x9E3779B97F4A7C15ULL;
    h ^= h >> 29;
  }
  h *= 0xBF58476D1CE4E5B9ULL;
  h ^= h >> 32;
  return (uint32_t)h;
}

static flow_t *lookup(const listener_t *l, const flow_key *k) {
  flow_t *f = l->buckets[hash_key(l, k) & (l->nbuckets - 1)];
  while (f != NULL && memcmp(&f->key, k, sizeof(*k)) != 0) f = f->hnext;
  return f;
}

static int insert(listener_t *l, flow_t *f) {
  if (l->count >= l->nbuckets) {
    uint32_t n = l->nbuckets * 2;
    flow_t **b = calloc(n, sizeof(*b));
    if (b == NULL) return ENOMEM;
    for (uint32_t i = 0; i < l->nbuckets; i++) {
      flow_t *g = l->buckets[i];
      while (g != NULL) {
        flow_t *next = g->hnext;
        uint32_t j = hash_key(l, &g->key) & (n - 1);
        g->hnext = b[j];
        b[j] = g;
        g = next;
      }
    }
    free(l->buckets);
    l->buckets = b;
    l->nbuckets = n;
  }
  uint32_t j = hash_key(l, &f->key) & (l->nbuckets - 1);
  f->hnext = l->buckets[j];
  l->buckets[j] = f;
  l->count++;
  return 0;
}

static void unlink_flow(listener_t *l, flow_t *f) {
  flow_t **p = &l->buckets[hash_key(l, &f->key) & (l->nbuckets - 1)];
  while (*p != NULL && *p != f) p = &(*p)->hnext;
  if (*p == f) {
    *p = f->hnext;
    l->count--;
  }
}

/*
 * Flow ids: a slot index in the low ID_SLOT_BITS (index + 1, so an id is never 0) and
 * the slot's generation above it, which moves on each time the slot is freed. JS holds
 * ids (listener.byId, each Flow); if a flow were ever freed here without JS hearing of
 * it (a failed N-API call in end_flow or call_js), JS's id must not name the next flow
 * in that slot -- another client's: a datagram sent or a close made on a stale id would
 * then go to the wrong client's flow. With the generation, a stale id finds nothing
 * (flow_by_id). Ids stay below 2^53, exact as JS numbers. A slot whose generation is
 * used up is retired (never reused): no id is ever handed out twice in a process.
 * Only open/send/close/sweep (JS's calls) look ids up; the datagram path never does.
 */
#define ID_SLOT_BITS 24
#define ID_MAX_SLOTS ((1u << ID_SLOT_BITS) - 1)
#define ID_MAX_GEN ((1u << (53 - ID_SLOT_BITS)) - 1)

static uint64_t make_id(uint32_t index, uint32_t gen) { return ((uint64_t)gen << ID_SLOT_BITS) | (uint64_t)(index + 1); }
static uint32_t id_index(uint64_t id) { return (uint32_t)(id & ((1u << ID_SLOT_BITS) - 1)) - 1; }

static int take_id(state_t *st, flow_t *f) {
  uint32_t index;
  if (st->nfree > 0) {
    index = st->free_ids[--st->nfree];
  } else {
    if (st->nslots == ID_MAX_SLOTS) return EMFILE;
    if (st->nslots == st->cap_slots) {
      uint32_t n = st->cap_slots == 0 ? 64 : st->cap_slots * 2;
      if (n > ID_MAX_SLOTS) n = ID_MAX_SLOTS;
      flow_t **s = realloc(st->slots, n * sizeof(*s));
      if (s == NULL) return ENOMEM;
      st->slots = s;
      uint32_t *g = realloc(st->gens, n * sizeof(*g));
      if (g == NULL) return ENOMEM;
      st->gens = g;
      uint32_t *fr = realloc(st->free_ids, n * sizeof(*fr));
      if (fr == NULL) return ENOMEM;
      st->free_ids = fr;
      st->cap_slots = n;
    }
    index = st->nslots++;
    st->gens[index] = 0;
  }
  st->slots[index] = f;
  f->id = make_id(index, st->gens[index]);
  return 0;
}

/* The flow's slot is free again; its id is dead for good (the next flow there gets another). */
static void release_id(state_t *st, flow_t *f) {
  uint32_t index = id_index(f->id);
  st->slots[index] = NULL;
  if (st->gens[index] == ID_MAX_GEN) return; /* retired: every id of this slot was handed out */
  st->gens[index]++;
  st->free_ids[st->nfree++] = index;
}

static flow_t *flow_by_id(state_t *st, listener_t *l, int64_t id) {
  if (id < 1 || id >= ((int64_t)1 << 53)) return NULL;
  uint32_t index = id_index((uint64_t)id);
  if (index >= st->nslots) return NULL; /* also an id of 0 in the low bits: index wraps to UINT32_MAX */
  flow_t *f = st->slots[index];
  return f != NULL && f->id == (uint64_t)id && f->l == l ? f : NULL;
}

/* ---- calling JavaScript ---------------------------------------------------------- */

/*
 * From a libuv callback: napi_make_callback enters the environment's context, and
 * runs process.nextTick and microtasks afterwards as for any I/O callback. Only
 * values that need no context are made before it (strings, numbers, typed arrays:
 * not Buffers, whose constructor looks the environment up through the context). An
 * exception goes where one from any I/O callback goes: 'uncaughtException'.
 */
static void call_js(listener_t *l, napi_ref fn_ref, size_t argc, const napi_value *argv) {
  napi_env env = l->st->env;
  napi_value recv, fn, result;
  if (napi_get_reference_value(env, l->receiver, &recv) != napi_ok) return;
  if (napi_get_reference_value(env, fn_ref, &fn) != napi_ok) return;
  napi_status s = napi_make_callback(env, l->actx, recv, fn, argc, argv, &result);
  if (s == napi_pending_exception) {
    napi_value err;
    if (napi_get_and_clear_last_exception(env, &err) == napi_ok) napi_fatal_exception(env, err);
  }
}

static void on_flow_closed(uv_handle_t *h) {
  flow_t *f = h->data;
  close(f->fd);
  free(f);
}

/* End a flow here; report it to JS (onEnd) when `err` is why. */
static void end_flow(flow_t *f, int err, int report) {
  listener_t *l = f->l;
  state_t *st = l->st;
  uint64_t id = f->id;
  unlink_flow(l, f);
  release_id(st, f);
  f->l = NULL;
  uv_close((uv_handle_t *)&f->poll, on_flow_closed);
  if (report && !l->closing) {
    napi_env env = st->env;
    napi_handle_scope scope;
    if (napi_open_handle_scope(env, &scope) != napi_ok) return;
    napi_value argv[2];
    if (napi_create_int64(env, (int64_t)id, &argv[0]) == napi_ok && napi_create_int32(env, -err, &argv[1]) == napi_ok) {
      call_js(l, l->on_end, 2, argv);
    }
    napi_close_handle_scope(env, scope);
  }
}

/* A datagram from an address with no flow: JS decides (cap, resolve, open, log). */
static void miss(listener_t *l, const struct sockaddr_in6 *name, socklen_t namelen, const unsigned char *data, size_t len) {
  napi_env env = l->st->env;
  char text[INET6_ADDRSTRLEN + IF_NAMESIZE + 2];
  unsigned port;
  if (name->sin6_family == AF_INET) {
    const struct sockaddr_in *s4 = (const struct sockaddr_in *)name;
    if (inet_ntop(AF_INET, &s4->sin_addr, text, sizeof(text)) == NULL) return;
    port = ntohs(s4->sin_port);
  } else if (name->sin6_family == AF_INET6) {
    if (inet_ntop(AF_INET6, &name->sin6_addr, text, sizeof(text)) == NULL) return;
    if (name->sin6_scope_id != 0) {
      /* As Node reports link-local peers: fe80::1%eth0. */
      size_t n = strlen(text);
      char ifname[IF_NAMESIZE];
      if (if_indextoname(name->sin6_scope_id, ifname) != NULL) snprintf(text + n, sizeof(text) - n, "%%%s", ifname);
      else snprintf(text + n, sizeof(text) - n, "%%%u", (unsigned)name->sin6_scope_id);
    }
    port = ntohs(name->sin6_port);
  } else {
    return;
  }
  napi_handle_scope scope;
  if (napi_open_handle_scope(env, &scope) != napi_ok) return;
  napi_value argv[4], ab;
  void *p;
  int ok = napi_create_string_latin1(env, text, NAPI_AUTO_LENGTH, &argv[0]) == napi_ok &&
           napi_create_uint32(env, port, &argv[1]) == napi_ok &&
           napi_create_arraybuffer(env, namelen, &p, &ab) == napi_ok;
  if (ok) {
    memcpy(p, name, namelen);
    ok = napi_create_typedarray(env, napi_uint8_array, namelen, ab, 0, &argv[2]) == napi_ok &&
         napi_create_arraybuffer(env, len, &p, &ab) == napi_ok;
  }
  if (ok) {
    if (len > 0) memcpy(p, data, len);
    ok = napi_create_typedarray(env, napi_uint8_array, len, ab, 0, &argv[3]) == napi_ok;
  }
  if (ok) call_js(l, l->on_miss, 4, argv);
  napi_close_handle_scope(env, scope);
}

/*
 * Errors that cost one datagram, not the flow: a full buffer (as UDP does), and
 * EMSGSIZE, a datagram larger than the way to its peer takes (an IPv4 target of a
 * 65,527-byte IPv6 datagram, or a path MTU learnt from ICMP "fragmentation needed",
 * which Linux reports once on a connected socket): the next datagram may fit, and
 * ending the flow would move the client to a new source port (QUIC, WireGuard).
 */
static int dropped(int e) { return e == EAGAIN || e == EWOULDBLOCK || e == ENOBUFS || e == EINTR || e == EMSGSIZE; }

/* At most this many queued ICMP errors are read per POLLERR callback: bounded work per turn. */
#define MAX_ERRQUEUE 64

/*
 * POLLERR: take the socket's pending error (SO_ERROR) and empty its error queue. A
 * socket with IP_RECVERR / IPV6_RECVERR set (we never set it, but an inherited
 * socket may have it) queues every ICMP error there, and POLLERR stays raised until
 * the queue is read: left alone, libuv would call back on every turn and no datagram
 * would be read. Returns the pending error (0 if none).
 */
static int take_error(int fd) {
  int e = 0;
  socklen_t n = sizeof(e);
  if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &e, &n) != 0) e = errno;
  unsigned char data[64], control[512];
  for (int i = 0; i < MAX_ERRQUEUE; i++) {
    struct iovec iov = {.iov_base = data, .iov_len = sizeof(data)};
    struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control, .msg_controllen = sizeof(control)};
    if (recvmsg(fd, &m, MSG_ERRQUEUE | MSG_DONTWAIT) < 0) break;
  }
  return e;
}

static void prepare_all(state_t *st) {
  for (int i = 0; i < VLEN; i++) {
    unsigned char *buf = st->pool + (size_t)i * SLOT;
    st->liov[i] = (struct iovec){.iov_base = buf, .iov_len = SLOT};
    st->fiov[i] = (struct iovec){.iov_base = buf, .iov_len = SLOT};
    memset(&st->lmsgs[i], 0, sizeof(st->lmsgs[i]));
    memset(&st->fmsgs[i], 0, sizeof(st->fmsgs[i]));
    st->lmsgs[i].msg_hdr.msg_name = &st->names[i];
    st->lmsgs[i].msg_hdr.msg_namelen = sizeof(st->names[i]);
    st->lmsgs[i].msg_hdr.msg_iov = &st->liov[i];
    st->lmsgs[i].msg_hdr.msg_iovlen = 1;
    st->fmsgs[i].msg_hdr.msg_iov = &st->fiov[i];
    st->fmsgs[i].msg_hdr.msg_iovlen = 1;
  }
  st->ldirty = 0;
}

/* The listening socket is readable: datagrams from clients. */
static void on_listener(uv_poll_t *h, int status, int events) {
  (void)events;
  listener_t *l = h->data;
  state_t *st = l->st;
  if (status < 0) {
    /* libuv stopped the handle on POLLERR: clear the error and go on reading (one
     * client's ICMP is no reason to stop, nor to skip the datagrams waiting). */
    take_error(l->fd);
    if (!l->reading || l->closing) return;
    uv_poll_start(&l->poll, UV_READABLE, on_listener);
  }
  for (int b = 0; b < MAX_BATCHES && l->reading && !l->closing; b++) {
    for (int i = 0; i < st->ldirty; i++) st->lmsgs[i].msg_hdr.msg_namelen = sizeof(st->names[i]);
    int n = recvmmsg(l->fd, st->lmsgs, VLEN, MSG_DONTWAIT, NULL);
    if (n <= 0) break;
    st->ldirty = n;
    for (int i = 0; i < n && !l->closing; i++) {
      struct msghdr *m = &st->lmsgs[i].msg_hdr;
      size_t len = st->lmsgs[i].msg_len;
      const unsigned char *data = st->liov[i].iov_base;
      if (m->msg_flags & MSG_TRUNC) continue; /* larger than any UDP payload: cannot be forwarded whole */
      flow_key k;
      make_key((const struct sockaddr *)&st->names[i], &k);
      flow_t *f = lookup(l, &k);
      if (f == NULL) {
        miss(l, &st->names[i], m->msg_namelen, data, len);
        continue;
      }
      f->last = l->stamp;
      if (send(f->fd, data, len, MSG_DONTWAIT | MSG_NOSIGNAL) >= 0) {
        l->bytes_out += len;
        l->dgrams_out++;
      } else if (!dropped(errno)) {
        /* ECONNREFUSED: the ICMP error of an earlier datagram, reported on this send. */
        end_flow(f, errno, 1);
      }
    }
    if (n < VLEN) break;
  }
}

/* A flow's socket is readable: datagrams from the target, for its client. */
static void on_flow(uv_poll_t *h, int status, int events) {
  (void)events;
  flow_t *f = h->data;
  listener_t *l = f->l;
  if (l == NULL) return;
  state_t *st = l->st;
  if (status < 0) {
    /* POLLERR: the socket's pending error, e.g. ECONNREFUSED after ICMP port
     * unreachable, which ends the flow; a lost datagram's error (EMSGSIZE) does not. */
    int e = take_error(f->fd);
    if (e != 0 && !dropped(e)) {
      end_flow(f, e, 1);
      return;
    }
    uv_poll_start(&f->poll, UV_READABLE, on_flow);
  }
  for (int b = 0; b < MAX_BATCHES; b++) {
    int n = recvmmsg(f->fd, st->fmsgs, VLEN, MSG_DONTWAIT, NULL);
    if (n < 0) {
      if (!dropped(errno)) end_flow(f, errno, 1);
      return;
    }
    if (n == 0) return;
    f->last = l->stamp;
    /* Every reply goes to the one client, from the listening socket (the address it sent to). */
    for (int i = 0; i < n; i++) {
      struct msghdr *m = &st->fmsgs[i].msg_hdr;
      st->fiov[i].iov_len = st->fmsgs[i].msg_len;
      m->msg_name = &f->client;
      m->msg_namelen = f->clen;
    }
    int sent = 0;
    while (sent < n) {
      int r = sendmmsg(l->fd, st->fmsgs + sent, (unsigned)(n - sent), MSG_DONTWAIT | MSG_NOSIGNAL);
      if (r <= 0) {
        /* A full buffer drops the rest, as UDP does; a datagram too big for the way back
         * (EMSGSIZE), or an address the client's side refuses (EPERM, EACCES), drops this
         * one and tries the next (the flow itself is fine). */
        if (r < 0 && errno == EINTR) continue;
        if (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != ENOBUFS) {
          sent++;
          continue;
        }
        break;
      }
      for (int i = sent; i < sent + r; i++) l->bytes_back += st->fmsgs[i].msg_len;
      l->dgrams_back += (uint64_t)r;
      sent += r;
    }
    /* Back to reading: no address, whole buffers. */
    for (int i = 0; i < n; i++) {
      st->fmsgs[i].msg_hdr.msg_name = NULL;
      st->fmsgs[i].msg_hdr.msg_namelen = 0;
      st->fiov[i].iov_len = SLOT;
    }
    if (n < VLEN) return;
  }
}

/* ---- closing --------------------------------------------------------------------- */

static void free_listener(listener_t *l) {
  free(l->buckets);
  free(l);
}

static void on_listener_closed(uv_handle_t *h) {
  listener_t *l = h->data;
  close(l->fd);
  l->handle_closed = 1;
  if (l->finalized) free_listener(l);
}

/* End every flow (no reports) and close the socket. No JS is called from here on. */
static void close_listener(listener_t *l) {
  if (l->closing) return;
  l->closing = 1;
  l->reading = 0;
  state_t *st = l->st;
  for (uint32_t i = 0; i < l->nbuckets; i++) {
    while (l->buckets[i] != NULL) end_flow(l->buckets[i], 0, 0);
  }
  if (l->prev != NULL) l->prev->next = l->next;
  else st->listeners = l->next;
  if (l->next != NULL) l->next->prev = l->prev;
  l->next = l->prev = NULL;
  napi_env env = st->env;
  napi_delete_reference(env, l->receiver);
  napi_delete_reference(env, l->on_miss);
  napi_delete_reference(env, l->on_end);
  napi_async_destroy(env, l->actx);
  uv_close((uv_handle_t *)&l->poll, on_listener_closed);
}

static void finalize_listener(napi_env env, void *data, void *hint) {
  (void)env;
  (void)hint;
  listener_t *l = data;
  l->finalized = 1;
  close_listener(l);
  if (l->handle_closed) free_listener(l);
}

/* The environment goes away (a worker thread ends): its loop must have no handles of ours. */
static void cleanup_env(void *arg) {
  state_t *st = arg;
  while (st->listeners != NULL) close_listener(st->listeners);
}

static void finalize_state(napi_env env, void *data, void *hint) {
  (void)env;
  (void)hint;
  /* The cleanup hook ran before (hooks run newest first, and N-API's own, which runs this, is older). */
  state_t *st = data;
  free(st->pool);
  free(st->slots);
  free(st->gens);
  free(st->free_ids);
  free(st);
}

/* ---- exports ---------------------------------------------------------------------- */

#define CHECK(env, call)                                                \
  do {                                                                  \
    if ((call) != napi_ok) {                                            \
      napi_throw_error((env), NULL, "udp_flows: N-API call failed");    \
      return NULL;                                                      \
    }                                                                   \
  } while (0)

static napi_value int_value(napi_env env, int64_t v) {
  napi_value r;
  if (napi_create_int64(env, v, &r) != napi_ok) return NULL;
  return r;
}

static int args(napi_env env, napi_callback_info info, size_t want, napi_value *argv, state_t **st) {
  size_t argc = want;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, (void **)st) != napi_ok) return 0;
  if (argc < want) {
    napi_throw_type_error(env, NULL, "udp_flows: missing arguments");
    return 0;
  }
  return 1;
}

/* The listener an external stands for; NULL (with a TypeError) for anything else or a closed one. */
static listener_t *listener_arg(napi_env env, napi_value v) {
  napi_valuetype t;
  void *p = NULL;
  if (napi_typeof(env, v, &t) != napi_ok || t != napi_external || napi_get_value_external(env, v, &p) != napi_ok || p == NULL) {
    napi_throw_type_error(env, NULL, "udp_flows: not a listener");
    return NULL;
  }
  listener_t *l = p;
  if (l->closing) {
    napi_throw_error(env, NULL, "udp_flows: listener closed");
    return NULL;
  }
  return l;
}

static int bytes_arg(napi_env env, napi_value v, void **data, size_t *len) {
  bool is = false;
  if (napi_is_typedarray(env, v, &is) == napi_ok && is) {
    napi_typedarray_type type;
    napi_value ab;
    size_t off;
    if (napi_get_typedarray_info(env, v, &type, len, data, &ab, &off) == napi_ok && type == napi_uint8_array) return 1;
  }
  napi_throw_type_error(env, NULL, "udp_flows: expected a Uint8Array");
  return 0;
}

static napi_value Listen(napi_env env, napi_callback_info info) {
  napi_value argv[4];
  state_t *st;
  if (!args(env, info, 4, argv, &st)) return NULL;
  int32_t fd;
  napi_valuetype t1, t2;
  CHECK(env, napi_get_value_int32(env, argv[0], &fd));
  CHECK(env, napi_typeof(env, argv[2], &t1));
  CHECK(env, napi_typeof(env, argv[3], &t2));
  if (t1 != napi_function || t2 != napi_function) {
    napi_throw_type_error(env, NULL, "udp_flows: listen(fd, receiver, onMiss, onEnd)");
    return NULL;
  }
  if (st->pool == NULL) {
    st->pool = malloc((size_t)VLEN * SLOT);
    if (st->pool == NULL) return int_value(env, -ENOMEM);
    prepare_all(st);
  }
  listener_t *l = calloc(1, sizeof(*l));
  if (l == NULL) return int_value(env, -ENOMEM);
  l->st = st;
  l->nbuckets = 64;
  l->buckets = calloc(l->nbuckets, sizeof(*l->buckets));
  if (l->buckets == NULL) {
    free(l);
    return int_value(env, -ENOMEM);
  }
  if (syscall(SYS_getrandom, &l->seed, sizeof(l->seed), 0) != (long)sizeof(l->seed)) {
    l->seed = uv_hrtime() ^ ((uint64_t)(uintptr_t)l << 16);
  }
  /* A copy of our own: the caller closes its handle on the same socket. */
  l->fd = fcntl(fd, F_DUPFD_CLOEXEC, 3);
  if (l->fd < 0) {
    int e = errno;
    free_listener(l);
    return int_value(env, -e);
  }
  int err = uv_poll_init(st->loop, &l->poll, l->fd);
  if (err != 0) {
    close(l->fd);
    free_listener(l);
    return int_value(env, err);
  }
  l->poll.data = l;
  napi_value name, ext;
  if (napi_create_string_utf8(env, "socket-proxyd:udp-flows", NAPI_AUTO_LENGTH, &name) != napi_ok ||
      napi_async_init(env, argv[1], name, &l->actx) != napi_ok ||
      napi_create_reference(env, argv[1], 1, &l->receiver) != napi_ok ||
      napi_create_reference(env, argv[2], 1, &l->on_miss) != napi_ok ||
      napi_create_reference(env, argv[3], 1, &l->on_end) != napi_ok ||
      napi_create_external(env, l, finalize_listener, NULL, &ext) != napi_ok) {
    /* Only on a dying environment: leak the refs rather than touch a half-made listener. */
    l->closing = 1;
    uv_close((uv_handle_t *)&l->poll, on_listener_closed);
    l->finalized = 1;
    napi_throw_error(env, NULL, "udp_flows: N-API call failed");
    return NULL;
  }
  l->next = st->listeners;
  if (l->next != NULL) l->next->prev = l;
  st->listeners = l;
  return ext;
}

static napi_value Start(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  state_t *st;
  if (!args(env, info, 1, argv, &st)) return NULL;
  listener_t *l = listener_arg(env, argv[0]);
  if (l == NULL) return NULL;
  int err = uv_poll_start(&l->poll, UV_READABLE, on_listener);
  if (err == 0) l->reading = 1;
  return int_value(env, err);
}

static napi_value Stop(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  state_t *st;
  if (!args(env, info, 1, argv, &st)) return NULL;
  listener_t *l = listener_arg(env, argv[0]);
  if (l == NULL) return NULL;
  l->reading = 0;
  return int_value(env, uv_poll_stop(&l->poll));
}

/* "1.2.3.4", "::1" or "fe80::1%eth0" (a numeric scope too), as JS's resolver gives them. */
static int target_addr(const char *host, int32_t port, int ipv6, struct sockaddr_in6 *out, socklen_t *len) {
  memset(out, 0, sizeof(*out));
  if (port < 0 || port > 65535) return EINVAL;
  if (!ipv6) {
    struct sockaddr_in *s4 = (struct sockaddr_in *)out;
    s4->sin_family = AF_INET;
    s4->sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, host, &s4->sin_addr) != 1) return EINVAL;
    *len = sizeof(*s4);
    return 0;
  }
  char buf[INET6_ADDRSTRLEN + IF_NAMESIZE + 2];
  size_t n = strlen(host);
  if (n >= sizeof(buf)) return EINVAL;
  memcpy(buf, host, n + 1);
  char *pct = strchr(buf, '%');
  if (pct != NULL) {
    *pct++ = '\0';
    char *end;
    unsigned long idx = strtoul(pct, &end, 10);
    out->sin6_scope_id = *pct != '\0' && *end == '\0' ? (uint32_t)idx : if_nametoindex(pct);
  }
  out->sin6_family = AF_INET6;
  out->sin6_port = htons((uint16_t)port);
  if (inet_pton(AF_INET6, buf, &out->sin6_addr) != 1) return EINVAL;
  *len = sizeof(*out);
  return 0;
}

static napi_value Open(napi_env env, napi_callback_info info) {
  napi_value argv[6];
  state_t *st;
  if (!args(env, info, 6, argv, &st)) return NULL;
  listener_t *l = listener_arg(env, argv[0]);
  if (l == NULL) return NULL;
  void *name;
  size_t namelen;
  if (!bytes_arg(env, argv[1], &name, &namelen)) return NULL;
  char host[INET6_ADDRSTRLEN + IF_NAMESIZE + 2];
  size_t hlen;
  int32_t port;
  bool ipv6;
  double now;
  CHECK(env, napi_get_value_string_utf8(env, argv[2], host, sizeof(host), &hlen));
  CHECK(env, napi_get_value_int32(env, argv[3], &port));
  CHECK(env, napi_get_value_bool(env, argv[4], &ipv6));
  CHECK(env, napi_get_value_double(env, argv[5], &now));
  if (namelen != sizeof(struct sockaddr_in) && namelen != sizeof(struct sockaddr_in6)) return int_value(env, -EINVAL);
  struct sockaddr_in6 target;
  socklen_t tlen;
  int err = target_addr(host, port, ipv6, &target, &tlen);
  if (err != 0) return int_value(env, -err);

  flow_t *f = calloc(1, sizeof(*f));
  if (f == NULL) return int_value(env, -ENOMEM);
  memcpy(&f->client, name, namelen);
  f->clen = (socklen_t)namelen;
  make_key((const struct sockaddr *)&f->client, &f->key);
  if (lookup(l, &f->key) != NULL) {
    free(f);
    return int_value(env, -EEXIST);
  }
  f->fd = socket(ipv6 ? AF_INET6 : AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (f->fd < 0) {
    err = errno;
    free(f);
    return int_value(env, -err);
  }
  /* connect(2) on a datagram socket only sets the peer: synchronous. */
  if (connect(f->fd, (const struct sockaddr *)&target, tlen) != 0) {
    err = errno;
    close(f->fd);
    free(f);
    return int_value(env, -err);
  }
  err = uv_poll_init(st->loop, &f->poll, f->fd);
  if (err != 0) {
    close(f->fd);
    free(f);
    return int_value(env, err);
  }
  f->poll.data = f;
  int e = take_id(st, f);
  if (e == 0) {
    e = insert(l, f);
    if (e != 0) release_id(st, f);
  }
  if (e == 0) {
    err = uv_poll_start(&f->poll, UV_READABLE, on_flow);
    if (err != 0) {
      unlink_flow(l, f);
      release_id(st, f);
      e = -err;
    }
  }
  if (e != 0) {
    uv_close((uv_handle_t *)&f->poll, on_flow_closed);
    return int_value(env, -e);
  }
  f->l = l;
  if (now > l->stamp) l->stamp = now;
  f->last = now;
  return int_value(env, (int64_t)f->id);
}

static napi_value Send(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  state_t *st;
  if (!args(env, info, 3, argv, &st)) return NULL;
  listener_t *l = listener_arg(env, argv[0]);
  if (l == NULL) return NULL;
  int64_t id;
  void *data;
  size_t len;
  CHECK(env, napi_get_value_int64(env, argv[1], &id));
  if (!bytes_arg(env, argv[2], &data, &len)) return NULL;
  flow_t *f = flow_by_id(st, l, id);
  if (f == NULL) return int_value(env, -ENOENT);
  f->last = l->stamp;
  if (send(f->fd, data, len, MSG_DONTWAIT | MSG_NOSIGNAL) >= 0) {
    l->bytes_out += len;
    l->dgrams_out++;
    return int_value(env, 0);
  }
  return int_value(env, dropped(errno) ? 0 : -errno);
}

static napi_value Close(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  state_t *st;
  if (!args(env, info, 2, argv, &st)) return NULL;
  listener_t *l = listener_arg(env, argv[0]);
  if (l == NULL) return NULL;
  int64_t id;
  CHECK(env, napi_get_value_int64(env, argv[1], &id));
  flow_t *f = flow_by_id(st, l, id);
  if (f != NULL) end_flow(f, 0, 0);
  return NULL;
}

static napi_value Sweep(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  state_t *st;
  if (!args(env, info, 3, argv, &st)) return NULL;
  listener_t *l = listener_arg(env, argv[0]);
  if (l == NULL) return NULL;
  double now, limit;
  CHECK(env, napi_get_value_double(env, argv[1], &now));
  CHECK(env, napi_get_value_double(env, argv[2], &limit));
  l->stamp = now;
  /*
   * Every id goes into the result before any flow is ended: a failed N-API call on the
   * way throws with no flow ended (JS still knows them all, the next sweep takes them),
   * never after some were ended unreported.
   */
  uint32_t n = 0;
  for (uint32_t i = 0; i < l->nbuckets; i++) {
    for (flow_t *f = l->buckets[i]; f != NULL; f = f->hnext) n += now - f->last >= limit;
  }
  napi_value out;
  CHECK(env, napi_create_array_with_length(env, n, &out));
  if (n == 0) return out;
  uint64_t *ids = malloc(n * sizeof(*ids));
  if (ids == NULL) {
    napi_throw_error(env, NULL, "udp_flows: out of memory");
    return NULL;
  }
  uint32_t k = 0;
  for (uint32_t i = 0; i < l->nbuckets && k < n; i++) {
    for (flow_t *f = l->buckets[i]; f != NULL && k < n; f = f->hnext) {
      if (now - f->last >= limit) ids[k++] = f->id;
    }
  }
  for (uint32_t j = 0; j < k; j++) {
    napi_value id;
    if (napi_create_int64(env, (int64_t)ids[j], &id) != napi_ok || napi_set_element(env, out, j, id) != napi_ok) {
      free(ids);
      napi_throw_error(env, NULL, "udp_flows: N-API call failed");
      return NULL;
    }
  }
  /* By id, not by walking the table again: what the result says is exactly what ends. */
  for (uint32_t j = 0; j < k; j++) {
    flow_t *f = flow_by_id(st, l, (int64_t)ids[j]);
    if (f != NULL) end_flow(f, 0, 0);
  }
  free(ids);
  return out;
}

static napi_value Stats(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  state_t *st;
  if (!args(env, info, 1, argv, &st)) return NULL;
  listener_t *l = listener_arg(env, argv[0]);
  if (l == NULL) return NULL;
  uint64_t v[4] = {l->bytes_out, l->bytes_back, l->dgrams_out, l->dgrams_back};
  l->bytes_out = l->bytes_back = l->dgrams_out = l->dgrams_back = 0;
  napi_value out, x;
  CHECK(env, napi_create_array_with_length(env, 4, &out));
  for (uint32_t i = 0; i < 4; i++) {
    CHECK(env, napi_create_double(env, (double)v[i], &x));
    CHECK(env, napi_set_element(env, out, i, x));
  }
  return out;
}

static napi_value CloseListener(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  state_t *st;
  if (!args(env, info, 1, argv, &st)) return NULL;
  listener_t *l = listener_arg(env, argv[0]);
  if (l == NULL) return NULL;
  close_listener(l);
  return NULL;
}

static state_t *get_state(napi_env env) {
  state_t *st = calloc(1, sizeof(*st));
  if (st == NULL) return NULL;
  st->env = env;
  if (napi_get_uv_event_loop(env, &st->loop) != napi_ok || napi_set_instance_data(env, st, finalize_state, NULL) != napi_ok) {
    free(st);
    return NULL;
  }
  napi_add_env_cleanup_hook(env, cleanup_env, st);
  return st;
}

NAPI_MODULE_INIT() {
  state_t *st = get_state(env);
  if (st == NULL) return NULL;
  static const struct {
    const char *name;
    napi_callback fn;
  } fns[] = {
      {"listen", Listen}, {"start", Start}, {"stop", Stop},   {"open", Open},   {"send", Send},
      {"close", Close},   {"sweep", Sweep}, {"stats", Stats}, {"closeListener", CloseListener},
  };
  for (size_t i = 0; i < sizeof(fns) / sizeof(fns[0]); i++) {
    napi_value fn;
    if (napi_create_function(env, fns[i].name, NAPI_AUTO_LENGTH, fns[i].fn, st, &fn) != napi_ok) return NULL;
    if (napi_set_named_property(env, exports, fns[i].name, fn) != napi_ok) return NULL;
  }
  return exports;
}
