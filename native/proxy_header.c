/*
 * proxy_header.c -- the PROXY protocol header of one accepted connection, read
 * and encoded in one call (haproxy's doc/proxy-protocol.txt, versions 1 and 2).
 *
 * Why this exists: the header needs both addresses of the accepted socket. Node
 * gives them only as objects of strings (getpeername()/getsockname() on the
 * handle: inet_ntop, three properties set from C++, ~1 us each), which the v2
 * encoder then parses back into bytes. Here the kernel's sockaddrs go straight
 * into the header: about a quarter of the cost, on every connection of a proxy
 * run with --proxy-protocol= (bench/ANALYSIS.md). src/engine/proxy-protocol.ts
 * keeps the same encoder in TypeScript, used when this addon cannot load, and
 * test/proxy-protocol-native.test.ts checks that the two agree byte for byte.
 *
 * Exports two functions:
 *   init(scratch: Buffer)   once: the buffer (>= 108 bytes) header() writes into
 *   header(fd: number, version: 1 | 2): number
 * header() writes the header for the connection on fd into the scratch buffer and
 * returns its length (15..104 bytes for v1, 16, 28 or 52 for v2; 0 when a TCP
 * client has already gone), plus 256 when the
 * client's first bytes are already waiting in the socket (a peek), so that the
 * caller knows, without a turn of the event loop, whether to send the header with
 * them or alone at once. It follows the
 * same family rule as the TypeScript encoder (src/engine/proxy-protocol.ts says why):
 *   both ends IPv4, or both IPv4-mapped IPv6: TCP4 / v2 0x11;
 *   otherwise IPv6 on either end: TCP6 / 0x21, an IPv4 end written ::ffff:a.b.c.d;
 *   anything else (AF_UNIX, a failed getpeername/getsockname): v1
 *   "PROXY UNKNOWN\r\n" (15 bytes), v2 LOCAL with family UNSPEC (16 bytes).
 * A scope id is not part of the header (as the TypeScript side drops "%scope").
 * Only calling it with the wrong argument types throws (a programming error).
 *
 * N-API only (NAPI_VERSION 8): one binary for every Node >= 18 of the same
 * platform/arch/libc. The scratch buffer is per module instance
 * (napi_set_instance_data), so the module is safe in several worker threads.
 */
#define NAPI_VERSION 8
#include <node_api.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

/* Or'ed into header()'s result: the client has bytes waiting (lengths are below 256). */
#define HAS_BYTES 256u

static const unsigned char V2_SIGNATURE[12] = {0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d,
                                               0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a};

/* One end, as the header carries it: 4 or 16 address bytes and a port. */
struct end {
  int v4; /* 1: the 4 bytes in addr[12..15] are the address (IPv4 or mapped) */
  unsigned char addr[16];
  uint16_t port; /* host order */
};

static const unsigned char MAPPED_PREFIX[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};

/* 0 if the sockaddr is not one the header can carry. */
static int read_end(const struct sockaddr_storage *ss, struct end *e) {
  if (ss->ss_family == AF_INET) {
    const struct sockaddr_in *s = (const struct sockaddr_in *)ss;
    memcpy(e->addr, MAPPED_PREFIX, 12);
    memcpy(e->addr + 12, &s->sin_addr, 4);
    e->v4 = 1;
    e->port = ntohs(s->sin_port);
    return 1;
  }
  if (ss->ss_family == AF_INET6) {
    const struct sockaddr_in6 *s = (const struct sockaddr_in6 *)ss;
    memcpy(e->addr, &s->sin6_addr, 16);
    e->v4 = 0;
    e->port = ntohs(s->sin6_port);
    return 1;
  }
  return 0;
}

static int is_mapped(const struct end *e) { return memcmp(e->addr, MAPPED_PREFIX, 12) == 0; }

/*
 * The header into out (at least 108 bytes); returns its length, or 0 when the
 * client of a TCP socket has gone (getpeername fails once it reset): LOCAL or
 * UNKNOWN would tell the backend to take the connection's own addresses, ours,
 * for the client's, which an allow-list of the proxy's address would let through.
 */
static size_t encode(int fd, int version, unsigned char *out) {
  struct sockaddr_storage peer, local;
  socklen_t plen = sizeof(peer), llen = sizeof(local);
  struct end src, dst;
  int lok = getsockname(fd, (struct sockaddr *)&local, &llen) == 0 && read_end(&local, &dst);
  int pok = getpeername(fd, (struct sockaddr *)&peer, &plen) == 0 && read_end(&peer, &src);
  if (lok && !pok) return 0;
  int ok = lok && pok;
  int four = 0;
  if (ok) {
    /* Both IPv4; or both IPv6 and both mapped (an IPv4 client on a dual-stack
     * socket): plain IPv4. Any other mix: IPv6, an IPv4 end as ::ffff:a.b.c.d
     * (which read_end already wrote). */
    four = (src.v4 && dst.v4) || (!src.v4 && !dst.v4 && is_mapped(&src) && is_mapped(&dst));
  }

  if (version == 1) {
    if (!ok) {
      memcpy(out, "PROXY UNKNOWN\r\n", 15);
      return 15;
    }
    char s[INET6_ADDRSTRLEN], d[INET6_ADDRSTRLEN];
    int af = four ? AF_INET : AF_INET6;
    const unsigned char *sa = four ? src.addr + 12 : src.addr;
    const unsigned char *da = four ? dst.addr + 12 : dst.addr;
    if (inet_ntop(af, sa, s, sizeof(s)) == NULL || inet_ntop(af, da, d, sizeof(d)) == NULL) {
      memcpy(out, "PROXY UNKNOWN\r\n", 15);
      return 15;
    }
    /* At most 6+5+39+1+39+1+5+1+5+2 = 104 bytes. */
    int n = snprintf((char *)out, 108, "PROXY %s %s %s %u %u\r\n", four ? "TCP4" : "TCP6", s, d,
                     (unsigned)src.port, (unsigned)dst.port);
    if (n > 0 && n < 108) return (size_t)n;
    memcpy(out, "PROXY UNKNOWN\r\n", 15);
    return 15;
  }

  memcpy(out, V2_SIGNATURE, 12);
  if (!ok) {
    out[12] = 0x20; /* version 2, LOCAL */
    out[13] = 0x00; /* UNSPEC */
    out[14] = 0;
    out[15] = 0;
    return 16;
  }
  out[12] = 0x21; /* version 2, PROXY */
  if (four) {
    out[13] = 0x11;
    out[14] = 0;
    out[15] = 12;
    memcpy(out + 16, src.addr + 12, 4);
    memcpy(out + 20, dst.addr + 12, 4);
    out[24] = (unsigned char)(src.port >> 8);
    out[25] = (unsigned char)src.port;
    out[26] = (unsigned char)(dst.port >> 8);
    out[27] = (unsigned char)dst.port;
    return 28;
  }
  out[13] = 0x21;
  out[14] = 0;
  out[15] = 36;
  memcpy(out + 16, src.addr, 16);
  memcpy(out + 32, dst.addr, 16);
  out[48] = (unsigned char)(src.port >> 8);
  out[49] = (unsigned char)src.port;
  out[50] = (unsigned char)(dst.port >> 8);
  out[51] = (unsigned char)dst.port;
  return 52;
}

/*
 * The buffer header() writes into, set once by init(): a call then passes two
 * integers and returns one, where returning a fresh Buffer from here would cost
 * more than the two system calls (N-API makes it its own ArrayBuffer and backing
 * store). The reference keeps it alive; its memory never moves. Per module
 * instance (napi_set_instance_data), so worker threads each have their own.
 */
struct scratch {
  napi_ref ref;
  unsigned char *data;
  size_t len;
};

static void FreeScratch(napi_env env, void *data, void *hint) {
  (void)hint;
  struct scratch *s = data;
  if (s->ref != NULL) napi_delete_reference(env, s->ref);
  free(s);
}

static napi_value Init(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  void *data = NULL;
  size_t len = 0;
  bool is_buffer = false;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok) return NULL;
  if (argc < 1 || napi_is_buffer(env, argv[0], &is_buffer) != napi_ok || !is_buffer ||
      napi_get_buffer_info(env, argv[0], &data, &len) != napi_ok || len < 108) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "init(scratch: Buffer of at least 108 bytes)");
    return NULL;
  }
  struct scratch *s = NULL;
  if (napi_get_instance_data(env, (void **)&s) != napi_ok) return NULL;
  if (s == NULL) {
    s = calloc(1, sizeof(*s));
    if (s == NULL || napi_set_instance_data(env, s, FreeScratch, NULL) != napi_ok) {
      free(s);
      napi_throw_error(env, "ENOMEM", "proxy_header: out of memory");
      return NULL;
    }
  } else if (s->ref != NULL) {
    napi_delete_reference(env, s->ref);
    s->ref = NULL;
  }
  if (napi_create_reference(env, argv[0], 1, &s->ref) != napi_ok) return NULL;
  s->data = data;
  s->len = len;
  return NULL;
}

static napi_value Header(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok) return NULL;
  int32_t fd = -1, version = 0;
  struct scratch *s = NULL;
  if (argc < 2 || napi_get_value_int32(env, argv[0], &fd) != napi_ok ||
      napi_get_value_int32(env, argv[1], &version) != napi_ok || (version != 1 && version != 2)) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "header(fd: number, version: 1 | 2)");
    return NULL;
  }
  if (napi_get_instance_data(env, (void **)&s) != napi_ok || s == NULL || s->data == NULL) {
    napi_throw_error(env, "ERR_INVALID_STATE", "proxy_header: header() before init()");
    return NULL;
  }
  uint32_t n = (uint32_t)encode(fd, version, s->data);
  /* Whether the client's first bytes are already in the socket: then the caller sends
   * the header with them, in one write; otherwise alone, at once. A one-byte peek, not
   * FIONREAD: that counts a UNIX socket's out-of-band byte, which no read returns, and
   * the header would wait for a read that never comes. A peek sees only what a read
   * gets: 1 for data, 0 for a FIN alone, -1 (EAGAIN) for nothing or urgent data alone. */
  unsigned char one;
  if (n != 0 && recv(fd, &one, 1, MSG_PEEK | MSG_DONTWAIT) == 1) n |= HAS_BYTES;
  napi_value result;
  if (napi_create_uint32(env, n, &result) != napi_ok) return NULL;
  return result;
}

NAPI_MODULE_INIT(/* napi_env env, napi_value exports */) {
  napi_value fn;
  if (napi_create_function(env, "init", NAPI_AUTO_LENGTH, Init, NULL, &fn) != napi_ok ||
      napi_set_named_property(env, exports, "init", fn) != napi_ok)
    return NULL;
  if (napi_create_function(env, "header", NAPI_AUTO_LENGTH, Header, NULL, &fn) != napi_ok ||
      napi_set_named_property(env, exports, "header", fn) != napi_ok)
    return NULL;
  return exports;
}
