#!/usr/bin/env bash
# A head: Corosync/Pacemaker, the NFS server, the shared disks, and (on the
# second head to come up) the cluster resources. Idempotent.
#
#   head.sh NAME     with NFSR_* from the Vagrantfile
#
# Lab shortcuts, not for production: no fencing (stonith-enabled=false),
# corosync without crypto on the host-only network.
set -euo pipefail

me=$1
: "${NFSR_SERVER:?}" "${NFSR_HEADS:?}" "${NFSR_VIPS:?}" "${NFSR_LAB_NET:?}"
say() { echo "head.sh[$me]: $*"; }
export DEBIAN_FRONTEND=noninteractive

pkgs=(pacemaker corosync pacemaker-cli-utils resource-agents crmsh pcs e2fsprogs dbus)
if [ "$NFSR_SERVER" = ganesha ]; then
    pkgs+=(nfs-ganesha nfs-ganesha-vfs)
else
    pkgs+=(nfs-kernel-server)
fi
apt-get install -y -q --no-install-recommends "${pkgs[@]}" >/dev/null

# --- the NFS server: started by the cluster (a clone on both heads), never by boot
if [ "$NFSR_SERVER" = ganesha ]; then
    systemctl disable --now nfs-ganesha >/dev/null 2>&1 || true
    # No static exports: each group adds its own over D-Bus once its disk is
    # mounted (ganesha-export below), the way ganesha HA setups do.
    cat >/etc/ganesha/ganesha.conf <<'CONF'
NFS_CORE_PARAM { Protocols = 3, 4; }
NFSV4 { Grace_Period = 20; Lease_Lifetime = 15; }
CONF
    install -d /etc/ganesha/exports
    for spec in $NFSR_VIPS; do
        v=${spec%%=*}
        id=$(( $(printf '%d' "'$v") - 86 ))   # a -> 11, b -> 12
        cat >"/etc/ganesha/exports/$v.conf" <<CONF
EXPORT {
    Export_Id = $id;
    Path = /srv/nfs/$v;
    Pseudo = /srv/nfs/$v;
    Protocols = 3, 4;
    Access_Type = RW;
    Squash = No_Root_Squash;
    FSAL { Name = VFS; }
}
CONF
    done
    cat >/etc/systemd/system/nfsr-ganesha-export@.service <<'UNIT'
[Unit]
Description=NFS-Ganesha export /srv/nfs/%i (added and removed over D-Bus)
Requires=nfs-ganesha.service
After=nfs-ganesha.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/sbin/nfsr-ganesha-export add %i
ExecStop=/usr/local/sbin/nfsr-ganesha-export remove %i
UNIT
    cat >/usr/local/sbin/nfsr-ganesha-export <<'SCRIPT'
#!/bin/sh
# nfsr-ganesha-export add|remove LETTER
set -e
conf=/etc/ganesha/exports/$2.conf
id=$(sed -n 's/.*Export_Id = \([0-9]*\);.*/\1/p' "$conf")
mgr() { dbus-send --system --print-reply --dest=org.ganesha.nfsd /org/ganesha/nfsd/ExportMgr "org.ganesha.nfsd.exportmgr.$@"; }
case $1 in
add) mgr AddExport "string:$conf" "string:EXPORT(Export_Id=$id)" ;;
remove) mgr RemoveExport "uint16:$id" || true ;;
esac
SCRIPT
    chmod 755 /usr/local/sbin/nfsr-ganesha-export
else
    systemctl disable --now nfs-server >/dev/null 2>&1 || true
    : >/etc/exports
fi
for spec in $NFSR_VIPS; do
    install -d "/srv/nfs/${spec%%=*}"
done

# --- the shared disks: head1 makes the filesystems once; labels find them
if [ "$me" = head1 ]; then
    i=0
    for spec in $NFSR_VIPS; do
        v=${spec%%=*}
        i=$((i + 1))
        # the extra disks, in attachment order: not the root disk, no partitions
        dev=$(lsblk -dnpo NAME,TYPE | awk '$2 == "disk" {print $1}' \
              | while read -r d; do
                    [ "$(lsblk -no NAME "$d" | wc -l)" = 1 ] && ! findmnt -S "$d" >/dev/null && echo "$d"
                done | sed -n "${i}p")
        [ -n "$dev" ] || { say "shared disk $i not found"; exit 1; }
        if ! blkid -L "nfsr-$v" >/dev/null 2>&1; then
            blkid "$dev" >/dev/null 2>&1 && { say "$dev has a signature but no label nfsr-$v; refusing to format"; exit 1; }
            mkfs.ext4 -q -L "nfsr-$v" "$dev"
            say "made ext4 nfsr-$v on $dev"
        fi
    done
fi

# --- corosync: same file on both heads
nodes=""
id=0
for spec in $NFSR_HEADS; do
    id=$((id + 1))
    nodes+="    node { ring0_addr: ${spec#*=}; name: ${spec%%=*}; nodeid: $id; }"$'\n'
done
cat >/etc/corosync/corosync.conf <<CONF
totem {
    version: 2
    cluster_name: nfsrlab
    transport: knet
    crypto_cipher: none
    crypto_hash: none
}
nodelist {
$nodes}
quorum {
    provider: corosync_votequorum
    two_node: 1
}
logging {
    to_syslog: yes
}
CONF
systemctl enable corosync pacemaker >/dev/null 2>&1
systemctl restart corosync
systemctl restart pacemaker

# --- resources: whichever head sees both online configures them, once
online() { crm_mon -1 2>/dev/null | grep -q "Online: \[ head1 head2 \]"; }
for _ in $(seq 1 60); do online && break; sleep 5; done
if ! online; then
    say "the peer is not online yet; the second head to come up configures the resources"
    exit 0
fi
if crm_resource --list 2>/dev/null | grep -q 'vip-'; then
    # A lab provisioned before the heads used the package pointed the agent
    # at /usr/local/bin/nfsreset: point it at the package's command.
    for spec in $NFSR_VIPS; do
        crm_resource -r "vip-${spec%%=*}" -p nfsreset_bin -v /usr/bin/nfsreset >/dev/null 2>&1 || true
    done
    say "resources already configured"
    exit 0
fi
say "configuring resources"
pcs property set stonith-enabled=false   # lab only: there is no fencing device
if [ "$NFSR_SERVER" = ganesha ]; then
    pcs resource create nfs-daemon systemd:nfs-ganesha clone
else
    pcs resource create nfs-daemon systemd:nfs-server clone
fi
for spec in $NFSR_VIPS; do
    v=${spec%%=*} rest=${spec#*=}
    ip=${rest%%=*} head=${rest#*=}
    pcs resource create "fs-$v" ocf:heartbeat:Filesystem device="-L nfsr-$v" \
        directory="/srv/nfs/$v" fstype=ext4 --group "grp-$v"
    if [ "$NFSR_SERVER" = ganesha ]; then
        pcs resource create "export-$v" "systemd:nfsr-ganesha-export@$v" --group "grp-$v"
    else
        # the same fsid on both heads: file handles survive the move
        pcs resource create "export-$v" ocf:heartbeat:exportfs directory="/srv/nfs/$v" \
            clientspec="${NFSR_LAB_NET}.0/24" options=rw,no_root_squash,sync \
            fsid="$(( $(printf '%d' "'$v") - 86 ))" --group "grp-$v"
    fi
    pcs resource create "vip-$v" ocf:nfsreset:IPaddr2nfs ip="$ip" cidr_netmask=24 \
        nfsreset_bin=/usr/bin/nfsreset nfsreset_port=2049 --group "grp-$v"
    pcs constraint order start nfs-daemon-clone "then" "grp-$v"
    pcs constraint location "grp-$v" prefers "$head=100"
done
crm_resource --wait --timeout=120s || true
crm_mon -1
