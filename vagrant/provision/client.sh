#!/usr/bin/env bash
# The client: mounts each VIP's export at /mnt/LETTER and installs the probe
# writer used by move-vip.sh. Idempotent.
set -euo pipefail
: "${NFSR_VIPS:?}" "${NFSR_NFS_VERS:=3}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
apt-get install -y -q --no-install-recommends nfs-common >/dev/null
install -m 755 /dev/stdin /usr/local/bin/nfsr-writer <<'WRITER'
#!/bin/sh
# nfsr-writer DIR LOG: write and fsync 4 KiB every 0.1 s, log the time each
# write completed (CLOCK_REALTIME, s). A VIP move shows as the gap between
# two lines. Runs until killed; move-vip.sh bounds it with timeout(1).
dir=$1 log=$2
: >"$log"
i=0
while :; do
    i=$((i + 1))
    if dd if=/dev/zero of="$dir/probe-$(hostname)" bs=4k count=1 conv=fsync status=none 2>/dev/null; then
        echo "$(date +%s.%N) $i" >>"$log"
    fi
    sleep 0.1
done
WRITER
for spec in $NFSR_VIPS; do
    v=${spec%%=*} rest=${spec#*=}
    ip=${rest%%=*}
    install -d "/mnt/$v"
    line="$ip:/srv/nfs/$v /mnt/$v nfs vers=$NFSR_NFS_VERS,proto=tcp,hard,_netdev,nofail 0 0"
    grep -qF "$line" /etc/fstab || echo "$line" >>/etc/fstab
done
systemctl daemon-reload
for spec in $NFSR_VIPS; do
    v=${spec%%=*}
    for _ in $(seq 1 30); do mountpoint -q "/mnt/$v" || mount "/mnt/$v" 2>/dev/null && break; sleep 5; done
    mountpoint -q "/mnt/$v" && echo "client.sh: /mnt/$v mounted" || echo "client.sh: /mnt/$v not mounted yet (cluster still starting?)"
done
