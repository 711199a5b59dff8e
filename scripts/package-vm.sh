#!/usr/bin/env bash
# Builds the node-identity Debian package and checks its systemd unit with
# `systemd-analyze verify`, against the unit and binary as the package installs them.
# Installs what it needs (cargo-deb from crates.io, systemd from Debian) if missing.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cargo-deb >/dev/null 2>&1 || cargo install cargo-deb --locked
if ! command -v systemd-analyze >/dev/null 2>&1; then
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd
fi

cargo deb -p node-identity --profile agent
deb=$(ls -t target/debian/node-identity_*.deb | head -n 1)
echo "package: $deb"
dpkg-deb --info "$deb" | sed -n '1,30p'
dpkg-deb --contents "$deb"

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
dpkg-deb -x "$deb" "$root"
unit=$(find "$root" -name node-identity.service | head -n 1)
[ -n "$unit" ] || { echo "the package has no node-identity.service" >&2; exit 1; }
# Verify inside the extracted package (--root: ExecStart resolves to the packaged
# binary), with the host's own units beside it so targets like sysinit.target resolve.
for d in /usr/lib/systemd/system /lib/systemd/system; do
  [ -d "$d" ] || continue
  mkdir -p "$root$d"
  cp -rn "$d"/. "$root$d"/ 2>/dev/null || true
done
# A directive systemd ignores is only a warning for systemd-analyze: fail on any output.
report=$(systemd-analyze verify --root="$root" "${unit#"$root"}" 2>&1) || { echo "$report" >&2; exit 1; }
if [ -n "$report" ]; then echo "$report" >&2; exit 1; fi
echo "systemd-analyze verify: OK, no warnings (${unit#"$root"})"
