#!/bin/sh
# Installs the real programs the tests talk to, from Debian's packages: quietly,
# idempotently (only what is missing), and only as root (CI runs as root).
#   PROXY protocol receivers: nginx, haproxy      DNS: dnsmasq, dig
#   metrics: promtool (prometheus)                HTTP/2: h2load (nghttp2-client)
#   bench peers: socat, wrk, iperf3, nginx's stream module
#   network namespaces and SYN drops: iproute2, nftables
#   arm64 notify addon: qemu-user-static (runs the arm64 node), gcc-aarch64-linux-gnu,
#     libc6-dev-arm64-cross, libc6-arm64-cross, libstdc++6-arm64-cross
set -eu

need=""
want() { # want COMMAND-OR-FILE PACKAGE
  case "$1" in
    /*) [ -e "$1" ] || need="$need $2" ;;
    *) command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || need="$need $2" ;;
  esac
}
want nginx nginx
want /usr/lib/nginx/modules/ngx_stream_module.so libnginx-mod-stream
want haproxy haproxy
want systemd-socket-activate systemd
want cc gcc
want dnsmasq dnsmasq-base
want dig bind9-dnsutils
want promtool prometheus
want h2load nghttp2-client
want socat socat
want wrk wrk
want iperf3 iperf3
want ip iproute2
want nft nftables
want ss iproute2
want qemu-aarch64-static qemu-user-static
want aarch64-linux-gnu-gcc gcc-aarch64-linux-gnu
# the arm64 libc headers native/build.sh --arch=arm64 compiles against: gcc-aarch64-linux-gnu
# only recommends them, and --no-install-recommends below leaves them out
want /usr/aarch64-linux-gnu/include/stdint.h libc6-dev-arm64-cross
# the arm64 Node's loader and C++ runtime under qemu (the Node itself: scripts/fetch-node-arm64.sh)
want /usr/aarch64-linux-gnu/lib/ld-linux-aarch64.so.1 libc6-arm64-cross
want /usr/aarch64-linux-gnu/lib/libstdc++.so.6 libstdc++6-arm64-cross

[ -n "$need" ] || exit 0
if [ "$(id -u)" != 0 ]; then
  echo "scripts/ci-deps.sh: missing:$need (run as root to install them)" >&2
  exit 0
fi
echo "scripts/ci-deps.sh: installing:$need"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null 2>&1 || apt-get update -q >/dev/null
# A package's postinst may start its service (nginx, haproxy, prometheus) where a service
# manager runs; the tests never use those instances, they start their own.
# shellcheck disable=SC2086
apt-get install -y -qq --no-install-recommends $need >/dev/null
