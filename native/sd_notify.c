/*
 * sd_notify.c -- the smallest sd_notify(3) transport Node can use.
 *
 * Why this exists: Node cannot create AF_UNIX datagram sockets (dgram only
 * knows udp4/udp6), the npm addons that can either drop or pad abstract
 * "@name" addresses, and spawning systemd-notify sends from the wrong pid,
 * which systemd's default NotifyAccess=main discards. So we do what
 * libsystemd's sd_pid_notify() does, and nothing else.
 *
 * Exports one function:
 *   send(socketPath: string, message: Buffer | string): number
 * It returns 0 on success or a positive errno. OS failures never throw; only
 * calling it with the wrong argument types does (a programming error).
 *
 * Only N-API (NAPI_VERSION 8) is used, so one binary loads on every Node >= 18
 * of the same platform/arch/libc. Nothing here keeps global state, so the
 * module is safe to load in several worker threads.
 */
#define NAPI_VERSION 8
#include <node_api.h>

#include <errno.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/un.h>
#include <unistd.h>

/*
 * Fill *sa from NOTIFY_SOCKET's value, with the EXACT address length.
 * - "/path": a filesystem socket; the length includes the trailing NUL (as
 *   libsystemd's sockaddr_un_set_path does).
 * - "@name": an abstract socket; '@' becomes the leading NUL and the length is
 *   offsetof(sun_path) + strlen -- no trailing NUL and no padding, because the
 *   kernel treats every byte of an abstract name as significant. Padding to
 *   sizeof(sockaddr_un) is exactly the bug that breaks node-unix-socket.
 * Like libsystemd we refuse len >= sizeof(sun_path) for both kinds, even
 * though an abstract name could use the last byte.
 */
static int make_addr(const char *path, size_t len, struct sockaddr_un *sa,
                     socklen_t *salen) {
  if (len < 2 || memchr(path, '\0', len) != NULL) return EINVAL;
  if (len >= sizeof(sa->sun_path)) return ENAMETOOLONG;
  if (path[0] != '/' && path[0] != '@') return EINVAL;

  memset(sa, 0, sizeof(*sa));
  sa->sun_family = AF_UNIX;
  memcpy(sa->sun_path, path, len);
  if (path[0] == '@') {
    sa->sun_path[0] = '\0';
    *salen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + len);
  } else {
    *salen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + len + 1);
  }
  return 0;
}

/*
 * One datagram on a fresh socket, closed straight after. We do not cache the
 * fd: notifications are rare (READY once, WATCHDOG every few seconds), the
 * target is re-read from the environment on every call, and a per-call socket
 * means no global state, no fd to leak, and nothing to clean up on unload --
 * the same trade libsystemd makes. Cost: two extra syscalls per ping.
 *
 * MSG_DONTWAIT: if the service manager's queue is full we return EAGAIN
 * instead of blocking Node's event loop (and with it all proxied traffic).
 * MSG_NOSIGNAL: never raise SIGPIPE. The kernel attaches our pid/uid/gid
 * itself because the receiver has SO_PASSCRED, so no SCM_CREDENTIALS needed.
 */
static int send_datagram(const struct sockaddr_un *sa, socklen_t salen,
                         const void *buf, size_t n) {
  int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return errno;

  ssize_t r = sendto(fd, buf, n, MSG_NOSIGNAL | MSG_DONTWAIT,
                     (const struct sockaddr *)sa, salen);
  int err = 0;
  if (r < 0)
    err = errno;
  else if ((size_t)r != n)
    err = EMSGSIZE; /* cannot happen for SOCK_DGRAM; be explicit anyway */
  close(fd);
  return err;
}

/* A failed napi_* call here means misuse or a dying env: throw and bail. */
#define CHECK(env, call)                                              \
  do {                                                                \
    if ((call) != napi_ok) {                                          \
      napi_throw_error((env), NULL, "sd_notify: N-API call failed"); \
      return NULL;                                                    \
    }                                                                 \
  } while (0)

static napi_value Send(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  napi_valuetype t;
  CHECK(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 2) {
    napi_throw_type_error(env, NULL, "send(socketPath, message): 2 arguments required");
    return NULL;
  }

  /* socketPath: measure first so an over-long value is never truncated
   * into something that looks valid. */
  CHECK(env, napi_typeof(env, argv[0], &t));
  if (t != napi_string) {
    napi_throw_type_error(env, NULL, "send: socketPath must be a string");
    return NULL;
  }
  size_t plen = 0;
  CHECK(env, napi_get_value_string_utf8(env, argv[0], NULL, 0, &plen));
  struct sockaddr_un sa;
  char path[sizeof(sa.sun_path)];
  int err = 0;
  socklen_t salen = 0;
  if (plen >= sizeof(path)) {
    err = ENAMETOOLONG;
  } else {
    size_t copied = 0;
    CHECK(env, napi_get_value_string_utf8(env, argv[0], path, sizeof(path), &copied));
    err = make_addr(path, copied, &sa, &salen);
  }

  /* message: a Buffer is sent as is; a string is sent as UTF-8. */
  bool is_buf = false;
  void *data = NULL;
  size_t n = 0;
  char *owned = NULL;
  CHECK(env, napi_is_buffer(env, argv[1], &is_buf));
  if (is_buf) {
    CHECK(env, napi_get_buffer_info(env, argv[1], &data, &n));
  } else {
    CHECK(env, napi_typeof(env, argv[1], &t));
    if (t != napi_string) {
      napi_throw_type_error(env, NULL, "send: message must be a Buffer or a string");
      return NULL;
    }
    if (err == 0) {
      CHECK(env, napi_get_value_string_utf8(env, argv[1], NULL, 0, &n));
      owned = malloc(n + 1);
      if (owned == NULL) {
        err = ENOMEM;
      } else if (napi_get_value_string_utf8(env, argv[1], owned, n + 1, &n) != napi_ok) {
        free(owned);
        napi_throw_error(env, NULL, "sd_notify: N-API call failed");
        return NULL;
      }
      data = owned;
    }
  }

  if (err == 0) err = send_datagram(&sa, salen, data, n);
  free(owned);

  napi_value result;
  CHECK(env, napi_create_int32(env, err, &result));
  return result;
}

/* NAPI_MODULE_INIT exports napi_register_module_v1 (found by dlsym, so no
 * module name is baked in) and makes the module context-aware. */
NAPI_MODULE_INIT() {
  napi_value fn;
  if (napi_create_function(env, "send", NAPI_AUTO_LENGTH, Send, NULL, &fn) != napi_ok) return NULL;
  if (napi_set_named_property(env, exports, "send", fn) != napi_ok) return NULL;
  return exports;
}
