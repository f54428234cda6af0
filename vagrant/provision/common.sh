#!/usr/bin/env bash
# Every head: install nfsreset from the Debian package the Vagrantfile
# uploaded (built on the host by packaging/build-deb.sh), as on a cluster
# head: apt resolves its dependencies from Debian. The package puts every
# front door in place: /usr/bin/nfsreset, the agent ocf:nfsreset:IPaddr2nfs
# (/usr/lib/ocf/resource.d/nfsreset/IPaddr2nfs), the unit nfsreset@.service
# and the keepalived script /usr/sbin/nfsreset-notify. Idempotent.
#
#   common.sh /tmp/nfsreset_<version>_all.deb
set -euo pipefail

deb=${1:?usage: common.sh PATH-TO-nfsreset.deb}
say() { echo "common.sh: $*"; }
export DEBIAN_FRONTEND=noninteractive

[ -r "$deb" ] || { echo "common.sh: $deb missing (build it on the host: bash packaging/build-deb.sh)" >&2; exit 1; }

apt-get update -q >/dev/null
# --reinstall: a rebuilt package of the same version replaces the installed
# one (its postinst restarts running watchers). Recommends come along: the
# kernel headers meta-package (for the watcher's BPF) and resource-agents.
apt-get install -y -q --reinstall "$deb" >/dev/null
# bcc compiles against the running kernel's headers; the meta-package above
# follows the newest kernel, which the box may not be running yet.
apt-get install -y -q "linux-headers-$(uname -r)" >/dev/null 2>&1 \
    || say "no linux-headers-$(uname -r): the watcher's BPF needs them, the agent does not (see nfsreset doctor)"

for path in /usr/bin/nfsreset /usr/lib/ocf/resource.d/nfsreset/IPaddr2nfs \
            /lib/systemd/system/nfsreset@.service /usr/sbin/nfsreset-notify; do
    [ -e "$path" ] || { echo "common.sh: the package installed no $path" >&2; exit 1; }
done
say "nfsreset $(dpkg-query -W -f='${Version}' nfsreset) installed from $(basename "$deb")"
