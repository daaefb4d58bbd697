#!/bin/sh
# Build the N-API addons in native/ into stripped shared objects, offline:
#   sd_notify.c  -> sd_notify.node   sd_notify(3) (src/system/notify.ts)
#   udp_flows.c  -> udp_flows.node   the UDP flows' data path (src/engine/datagram.ts)
#   proxy_header.c -> proxy_header.node  the PROXY protocol header (src/engine/proxy-protocol.ts)
# Separate files, not one: each is loaded only when needed (NOTIFY_SOCKET set; a datagram
# socket served; --proxy-protocol= given), and the notify one stays a stateless few lines
# that cannot be broken by the others.
#
#   native/build.sh [--arch=ARCH] [OUTPUT]
#       ARCH     the target: this machine's (default) or arm64 (cross-compiled)
#       OUTPUT   a directory: every addon in it (default: prebuilds/linux-<ARCH>/);
#                a file NAME.node: only native/NAME.c, into that file
#
# The committed prebuilds are made on Debian 12 with
#   native/build.sh                 (gcc, linux-x64)
#   native/build.sh --arch=arm64    (aarch64-linux-gnu-gcc from gcc-aarch64-linux-gnu)
# and are reproducible: the same compiler gives the same bytes, whatever the
# checkout's path (test/notify*.test.ts, test/udp-native.test.ts and
# test/proxy-protocol-native.test.ts compare them with fresh builds).
#
# Needs only a C compiler ($CC; default gcc, or aarch64-linux-gnu-gcc when
# cross-compiling for arm64 from another machine) and Node's N-API headers, which are
# looked for on this machine -- never downloaded:
#   $NODE_API_INCLUDE (a dir holding node_api.h), the `node` npm package in
#   node_modules, <dir of node>/../include/node, npm's configured nodedir,
#   /usr/include/node, /usr/local/include/node, node-gyp's cache.
# The headers' Node version and architecture do not matter: the source pins
# NAPI_VERSION 8 and N-API's headers are the same for every arch, so the x64
# `node` package's headers serve an arm64 build too, and the result loads on any
# Node >= 18 with the same platform/arch/libc.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")

case "$(uname -s)" in
  Linux) platform=linux ;;
  *) echo "build.sh: only Linux is supported (sd_notify is a systemd protocol; the UDP path uses recvmmsg)" >&2; exit 1 ;;
esac
# Node's process.arch names, which is what src/notify.ts looks for in prebuilds/.
case "$(uname -m)" in
  x86_64) host=x64 ;;
  aarch64 | arm64) host=arm64 ;;
  armv7l) host=arm ;;
  ppc64le) host=ppc64 ;;
  s390x) host=s390x ;;
  riscv64) host=riscv64 ;;
  *) echo "build.sh: unknown machine $(uname -m)" >&2; exit 1 ;;
esac
arch=$host
case "${1:-}" in
  --arch=*) arch=${1#--arch=}; shift ;;
esac
if [ $# -gt 1 ]; then
  echo "usage: native/build.sh [--arch=ARCH] [OUTPUT]" >&2; exit 1
fi
if [ "$arch" = "$host" ]; then
  cc=${CC:-gcc}
else
  case "$arch" in
    arm64) cc=${CC:-aarch64-linux-gnu-gcc} ;;
    *) cc=${CC:-}
       if [ -z "$cc" ]; then
         echo "build.sh: cross-compiling for $arch needs CC set to a cross compiler" >&2; exit 1
       fi ;;
  esac
fi
if ! command -v "$cc" >/dev/null 2>&1; then
  hint=""
  [ "$arch" = arm64 ] && [ "$host" != arm64 ] && hint=" (Debian: apt-get install gcc-aarch64-linux-gnu)"
  echo "build.sh: C compiler $cc not found$hint" >&2; exit 1
fi
out=${1:-"$root/prebuilds/$platform-$arch"}
case "$out" in
  *.node) name=$(basename "$out" .node)
          [ -f "$here/$name.c" ] || { echo "build.sh: no native/$name.c for $out" >&2; exit 1; }
          addons=$name ;;
  *) addons="sd_notify udp_flows proxy_header" ;;
esac

has_headers() { [ -n "$1" ] && [ -f "$1/node_api.h" ]; }

find_headers() {
  if [ -n "${NODE_API_INCLUDE:-}" ]; then
    has_headers "$NODE_API_INCLUDE" && { echo "$NODE_API_INCLUDE"; return; }
    echo "build.sh: NODE_API_INCLUDE=$NODE_API_INCLUDE has no node_api.h" >&2; exit 1
  fi
  # The `node` devDependency ships headers in its platform package.
  for d in "$root"/node_modules/node/node_modules/node-*/include/node; do
    has_headers "$d" && { echo "$d"; return; }
  done
  # A normal install: <prefix>/bin/node next to <prefix>/include/node.
  if command -v node >/dev/null 2>&1; then
    d=$(dirname "$(dirname "$(command -v node)")")/include/node
    has_headers "$d" && { echo "$d"; return; }
  fi
  # npm's nodedir (prints a warning to stderr on newer npm; harmless).
  if command -v npm >/dev/null 2>&1; then
    d=$(npm config get nodedir 2>/dev/null || true)
    [ -n "$d" ] && [ "$d" != undefined ] && has_headers "$d/include/node" && { echo "$d/include/node"; return; }
  fi
  for d in /usr/include/node /usr/local/include/node "$HOME"/.cache/node-gyp/*/include/node; do
    has_headers "$d" && { echo "$d"; return; }
  done
  echo "build.sh: no N-API headers (node_api.h) found; set NODE_API_INCLUDE" >&2
  exit 1
}
inc=$(find_headers)

# -shared without -z defs: the napi_* (and uv_*) symbols are resolved against the node
# executable at dlopen time. -s strips; --build-id=none and no debug info keep
# the output a pure function of source + compiler, so a rebuild can be compared
# byte for byte with the committed binary; -ffile-prefix-map keeps the checkout's
# path out even if the source ever uses __FILE__ or assert(). arm64 keeps the
# linker's default 64 KiB segment alignment (hence a 64 KiB file): kernels with
# 64 KiB pages (RHEL on Graviton/Ampere) cannot map a 4 KiB-aligned object.
build() { # build NAME OUTPUT-FILE
  mkdir -p "$(dirname "$2")"
  tmp="$2.tmp.$$"
  trap 'rm -f "$tmp"' EXIT
  LC_ALL=C "$cc" -std=c11 -D_GNU_SOURCE -O2 -fPIC -fvisibility=hidden \
    -Wall -Wextra \
    -ffile-prefix-map="$root"=. \
    -I"$inc" -shared -s \
    -Wl,--build-id=none -Wl,-z,relro -Wl,-z,now -Wl,--as-needed \
    -o "$tmp" "$here/$1.c"
  mv -f "$tmp" "$2"
  trap - EXIT
  echo "built $2 for $platform-$arch with $cc (headers: $inc)" >&2
}
for name in $addons; do
  case "$out" in
    *.node) build "$name" "$out" ;;
    *) build "$name" "$out/$name.node" ;;
  esac
done
