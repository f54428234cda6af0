#!/usr/bin/env bash
# Set up nfsreset on a Debian 12 machine, as root. Idempotent; a second run
# only checks and takes a few seconds.
#
#   bash setup.sh            Debian packages, kernel headers for bcc, tracefs, .venv
#   NFSRESET_SKIP_APT=1      skip apt (packages installed some other way)
#
# After it: .venv/bin/nfsreset is the command.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
venv="$here/.venv"

die() { echo "setup.sh: $*" >&2; exit 1; }
say() { echo "setup.sh: $*"; }

[ "$(id -u)" = 0 ] || die "must run as root (it installs Debian packages and loads BPF); try: sudo bash setup.sh"
[ -r /etc/debian_version ] || die "needs Debian 12 (bookworm); /etc/debian_version not found"
[ -x /usr/bin/python3 ] || die "/usr/bin/python3 missing; install it: apt-get install python3"

# Debian packages. bcc and the nftables bindings exist only for /usr/bin/python3,
# which is why the venv below is made from it with --system-site-packages.
pkgs=(
    python3-bpfcc bpfcc-tools python3-nftables nftables python3-venv python3-pip
    iproute2 iputils-ping iputils-arping ndisc6 bpftool procps tcpdump
    linux-headers-amd64
    # front doors (cli/) and their checks in the test suite; keepalived only
    # for tests/ns/test_keepalived.py (its service stays off: no keepalived.conf)
    resource-agents shellcheck libxml2-utils vagrant vagrant-libvirt keepalived
    # the .deb's own Python dependencies on /usr/bin/python3 (the venv has
    # PyPI's): tests/ns/test_keepalived.py runs the packaged nfsreset on them
    python3-pyroute2 python3-typer
    # tests/ns/test_systemd_package.py boots systemd in a container (it may
    # upgrade systemd to the same version); packaging/build-deb.sh installs
    # its own build dependencies
    systemd-container
    # the lab's real NFS server (nfsreset lab --server ganesha); installing starts
    # no service here, the lab runs them in its own namespaces
    nfs-ganesha nfs-ganesha-vfs rpcbind
    # nfsreset lab --mover pacemaker: a real cluster, run only inside the lab's
    # namespaces (not pcs: it pulls in ruby and upgrades host packages)
    corosync pacemaker pacemaker-cli-utils crmsh
)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ] && [ -z "${NFSRESET_SKIP_APT:-}" ]; then
    say "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null || die "apt-get update failed; check the network and /etc/apt/sources.list"
    # Installing must start no service on this host (corosync's and pacemaker's
    # postinst call invoke-rc.d start): a policy-rc.d saying "no" for the
    # install, unless the host already has one of its own.
    policy=/usr/sbin/policy-rc.d
    own_policy=""
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\n# setup.sh (nfsreset): no service starts during its install\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        own_policy=1
        trap 'rm -f "$policy"' EXIT
    fi
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null \
        || die "apt-get install failed for: ${missing[*]}"
    if [ -n "$own_policy" ]; then rm -f "$policy"; trap - EXIT; fi
    # The exact headers of the running kernel are better than any other; take
    # them where Debian has them (a stock Debian kernel), silently skip where not.
    apt-get install -y -q --no-install-recommends "linux-headers-$(uname -r)" >/dev/null 2>&1 || true
fi

# The cluster packages are for the lab's namespaces only; say so if one runs in
# this host's own PID namespace (a running lab's nodes have PID namespaces of their own).
own_pidns=$(readlink /proc/self/ns/pid)
for pid in $(pgrep -x corosync || true) $(pgrep -x pacemakerd || true); do
    if [ "$(readlink "/proc/$pid/ns/pid" 2>/dev/null)" = "$own_pidns" ]; then
        say "warning: $(cat "/proc/$pid/comm" 2>/dev/null) (pid $pid) runs on this host; the lab does not use it"
    fi
done

# bcc finds headers through /lib/modules/$(uname -r)/{build,source}. On a kernel
# without a headers package (custom or cloud kernels) point those at the nearest
# Debian headers. That is harmless: every kernel struct offset our BPF code uses
# comes from BTF, not from these headers. A real tree is never replaced.
kdir="/lib/modules/$(uname -r)"
if [ ! -e "$kdir/build/include" ]; then
    best=""
    for d in /usr/src/linux-headers-*-amd64 /usr/src/linux-headers-*-"$(dpkg --print-architecture)"; do
        [ -d "$d/include" ] && best="$d"
    done
    [ -n "$best" ] || die "no kernel headers under /usr/src; install them: apt-get install linux-headers-amd64"
    common="${best%-*}-common"
    mkdir -p "$kdir"
    if [ -L "$kdir/build" ] || [ ! -e "$kdir/build" ]; then
        ln -sfn "$best" "$kdir/build"
        [ -d "$common" ] && ln -sfn "$common" "$kdir/source"
        say "no headers for kernel $(uname -r); bcc will use $best (offsets come from BTF)"
    else
        die "$kdir/build exists but has no include/; fix or remove it, then run again"
    fi
fi

# The flow tracker needs no tracefs (raw tracepoints); mounted for bcc programs
# with classic tracepoints and for debugging.
if [ ! -e /sys/kernel/tracing/events ]; then
    mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null \
        || say "warning: could not mount tracefs at /sys/kernel/tracing (the flow tracker does not need it)"
fi
[ -r /sys/kernel/btf/vmlinux ] || say "warning: /sys/kernel/btf/vmlinux missing; BPF flow tracking will be off (CONFIG_DEBUG_INFO_BTF)"

# The venv: Debian's python with system site-packages (bcc, nftables).
if [ ! -x "$venv/bin/python" ]; then
    say "creating $venv"
    /usr/bin/python3 -m venv --system-site-packages "$venv" || die "python3 -m venv failed; install it: apt-get install python3-venv"
fi
stamp="$venv/.installed-$(sha1sum "$here/pyproject.toml" | cut -c1-12)"
if [ ! -e "$stamp" ]; then
    say "installing nfsreset into $venv"
    "$venv/bin/pip" install -q --disable-pip-version-check -e "${here}[test]" --config-settings editable_mode=compat \
        || die "pip install failed; see the output above"
    rm -f "$venv"/.installed-*
    touch "$stamp"
fi
# Byte-compile now, as a package install would: hooks are fresh processes, and
# without cached bytecode each one compiles its ~12 modules first (~14 ms), more
# so where PYTHONDONTWRITEBYTECODE is set. Stale files are harmless: Python
# checks the source's mtime and compiles in memory when it changed.
"$venv/bin/python" -m compileall -q "$here/nfsreset" >/dev/null || die "python -m compileall failed"
"$venv/bin/python" -c 'import bcc, nftables, pyroute2, typer' 2>/dev/null \
    || die "the venv cannot import bcc/nftables/pyroute2/typer; remove $venv and run again"
say "ready: $venv/bin/nfsreset"
