#!/usr/bin/env bash
# Every head: install nfsreset from the rsynced checkout (/nfsreset) with its
# own setup.sh, then the front doors (OCF agent, systemd unit, keepalived
# script) where cli/README.md says they go. Idempotent.
set -euo pipefail

src=/nfsreset
say() { echo "common.sh: $*"; }

[ -r "$src/setup.sh" ] || { echo "common.sh: $src/setup.sh missing (rsync failed?)" >&2; exit 1; }
bash "$src/setup.sh"

ln -sfn "$src/.venv/bin/nfsreset" /usr/local/bin/nfsreset
install -D -m 755 "$src/cli/ocf/nfsreset" /usr/lib/ocf/resource.d/nfsreset/IPaddr2nfs
install -D -m 755 "$src/cli/keepalived/nfsreset-notify" /usr/local/sbin/nfsreset-notify
install -D -m 644 "$src/cli/systemd/nfsreset@.service" /etc/systemd/system/nfsreset@.service
install -d -m 750 /var/lib/nfsreset
systemctl daemon-reload
say "nfsreset $(/usr/local/bin/nfsreset --version 2>/dev/null || echo '(version unknown)') installed"
