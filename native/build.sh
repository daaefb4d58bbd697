#!/bin/sh
# Build native/sd_notify.c into a stripped N-API addon, offline.
#
#   native/build.sh [OUTPUT]      default: prebuilds/<platform>-<arch>/sd_notify.node
#
# Needs only a C compiler ($CC, default gcc) and Node's N-API headers, which are
# looked for on this machine -- never downloaded:
#   $NODE_API_INCLUDE (a dir holding node_api.h), the `node` npm package in
#   node_modules, <dir of node>/../include/node, npm's configured nodedir,
#   /usr/include/node, /usr/local/include/node, node-gyp's cache.
# The headers' Node version does not matter: the source pins NAPI_VERSION 8, so
# the result loads on any Node >= 18 with the same platform/arch/libc.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
src="$here/sd_notify.c"
cc=${CC:-gcc}

case "$(uname -s)" in
  Linux) platform=linux ;;
  *) echo "build.sh: only Linux is supported (sd_notify is a systemd protocol)" >&2; exit 1 ;;
esac
case "$(uname -m)" in
  x86_64) arch=x64 ;;
  aarch64 | arm64) arch=arm64 ;;
  armv7l) arch=arm ;;
  ppc64le) arch=ppc64 ;;
  s390x) arch=s390x ;;
  riscv64) arch=riscv64 ;;
  *) echo "build.sh: unknown machine $(uname -m)" >&2; exit 1 ;;
esac
out=${1:-"$root/prebuilds/$platform-$arch/sd_notify.node"}

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

mkdir -p "$(dirname "$out")"
tmp="$out.tmp.$$"
trap 'rm -f "$tmp"' EXIT
# -shared without -z defs: the napi_* symbols are resolved against the node
# executable at dlopen time. -s strips; --build-id=none and no debug info keep
# the output a pure function of source + compiler, so a rebuild can be compared
# byte for byte with the committed binary.
"$cc" -std=c11 -D_GNU_SOURCE -O2 -fPIC -fvisibility=hidden \
  -Wall -Wextra \
  -I"$inc" -shared -s \
  -Wl,--build-id=none -Wl,-z,relro -Wl,-z,now -Wl,--as-needed \
  -o "$tmp" "$src"
mv -f "$tmp" "$out"
trap - EXIT
echo "built $out (headers: $inc)" >&2
