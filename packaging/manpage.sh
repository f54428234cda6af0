#!/bin/sh
# manpage.sh VERSION OUT: nfsreset(8) from the command's own --help (help2man),
# with each subcommand's --help, the files the package installs and the exit
# codes. Run by debian/rules with PYTHONPATH at the built package; the command
# is exec'd as "nfsreset" so the usage lines say so.
set -eu
version=$1 out=$2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir "$tmp/bin"
cat >"$tmp/bin/nfsreset" <<'PY'
#!/usr/bin/python3
import sys
from nfsreset.cli.main import main
sys.exit(main())
PY
chmod 755 "$tmp/bin/nfsreset"
PATH="$tmp/bin:$PATH"
export PATH

# (no pipefail in sh: check the command itself runs before piping its help)
nfsreset --help >/dev/null || { echo "manpage.sh: nfsreset --help failed (PYTHONPATH=${PYTHONPATH:-})" >&2; exit 1; }
inc="$tmp/include"
{
	echo "[COMMANDS]"
	for cmd in kill tickle watch flows doctor lab; do
		echo ".SS $cmd"
		echo ".nf"
		# roff: a leading dot or quote would be a request; backslashes escaped
		COLUMNS=80 nfsreset "$cmd" --help | sed -e 's/\\/\\\\/g' -e "s/^\([.']\)/\\\\\&\1/" | sed -n '/^Usage:/,$p'
		echo ".fi"
	done
	cat <<'ROFF'
[EXIT STATUS]
0 done; 1 some sessions could not be ended (for \fBflows\fR: stale sessions
exist); 2 bad input (one line on stderr: \fBnfsreset\fR \fICMD\fR: what and
why); 3 refused for safety.
[FILES]
.TP
.I /etc/nfsreset/NAME.toml
configuration of the watcher \fBnfsreset@NAME.service\fR; an annotated example
is /etc/nfsreset/nfs.toml.example
.TP
.I /lib/systemd/system/nfsreset@.service
the watcher, one instance per configuration file
.TP
.I /usr/lib/ocf/resource.d/nfsreset/IPaddr2nfs
the Pacemaker agent \fBocf:nfsreset:IPaddr2nfs\fR (IPaddr2 plus nfsreset)
.TP
.I /usr/sbin/nfsreset-notify
keepalived notify script (\fBnotify "/usr/sbin/nfsreset-notify \-\-vip VIP" root\fR)
.TP
.I /var/lib/nfsreset
state directory: the clients of each VIP, recorded when it leaves
.TP
.I /usr/share/doc/nfsreset/
README.md, cli-README.md (the three front doors), internals.md
[SEE ALSO]
.BR nft (8),
.BR ss (8),
.BR systemd.exec (5),
.BR ocf-tester (8)
ROFF
} >"$inc"

COLUMNS=80 help2man --no-info --section=8 --version-string="$version" \
	--name="end stale TCP sessions when a floating IP moves" \
	--include="$inc" --output="$out" nfsreset
# help2man cannot say why --version failed; a page without our sections is a bug
grep -q '^\.SS kill' "$out"
grep -q '^\.SH FILES' "$out"
