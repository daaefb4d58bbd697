#!/bin/sh
# Installs the tools the benchmark suite uses, from Debian's packages.
# Non-interactive; safe to re-run (only missing tools are installed).
#   load and backends: iperf3 (bulk), wrk (HTTP load), nginx (HTTP backend)
#   comparisons: socat, haproxy, nginx-stream (nginx + libnginx-mod-stream)
set -eu

need=""
command -v iperf3 >/dev/null 2>&1 || need="$need iperf3"
command -v wrk >/dev/null 2>&1 || need="$need wrk"
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need="$need nginx"
command -v socat >/dev/null 2>&1 || need="$need socat"
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || need="$need haproxy"
# Debian builds nginx's stream module as a loadable module in its own package.
[ -f /usr/lib/nginx/modules/ngx_stream_module.so ] || need="$need libnginx-mod-stream"

if [ -z "$need" ]; then
  echo "bench/setup.sh: all tools present"
  exit 0
fi

if [ "$(id -u)" != 0 ]; then
  echo "bench/setup.sh: missing:$need"
  echo "install them as root:  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends$need"
  exit 1
fi

echo "bench/setup.sh: installing:$need"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
# nginx's package starts the default site on :80 through its postinst when a service
# manager exists; the bench never uses that instance, it starts its own with its own config.
# shellcheck disable=SC2086
apt-get install -y -q --no-install-recommends $need >/dev/null
echo "bench/setup.sh: done"
