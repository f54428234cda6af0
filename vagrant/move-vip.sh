#!/usr/bin/env bash
# move-vip.sh [--without-nfsreset] [LETTER [ROUNDS]]
# move-vip.sh --analyze MOVES LOG [SETTLE]      (the stall report alone)
#
# While the client writes to /mnt/LETTER every 0.1 s, move grp-LETTER (disk,
# export, VIP) to the other head and back ROUNDS times, then print for each
# move the longest gap between two completed writes: the stall the client saw.
#
#   ./move-vip.sh a 3                     with nfsreset (the agent as installed)
#   ./move-vip.sh --without-nfsreset a 3  nfsreset_bin=/bin/false: the agent
#                                         then behaves exactly like IPaddr2
#
# Failback (the move back home) is the one nfsreset is for: without it an
# NFSv3 client over TCP can wait ~180 s there. SETTLE (default 20 s) is the
# time between moves; a stall longer than SETTLE runs into the next window.
set -euo pipefail
cd "$(dirname "$0")"

# stalls MOVES LOG SETTLE: MOVES has "EPOCH TARGET LABEL" per move, LOG the
# writer's "EPOCH SEQ" lines; prints the longest gap in each move's window
# (from 1 s before it to the next move).
stalls() {
    awk -v settle="$3" '
    NR == FNR { t[NR] = $1; what[NR] = $2 " (" $3 ")"; n = NR; next }
    { w[++m] = $1 }
    END {
        for (i = 1; i <= n; i++) {
            lo = t[i] - 1; hi = (i < n) ? t[i + 1] : t[i] + settle
            worst = 0; prev = 0; after = 0
            for (j = 1; j <= m; j++) {
                if (w[j] < lo) { prev = w[j]; continue }
                # a gap that began in this window counts even if it ends later
                if (prev && w[j] - prev > worst) worst = w[j] - prev
                prev = w[j]
                if (w[j] > t[i]) after = 1
                if (w[j] > hi) break
            }
            if (!after)
                printf "  move %d to %-22s no write completed after it\n", i, what[i]
            else
                printf "  move %d to %-22s stall %6.2f s%s\n", i, what[i], worst, (worst + 1 > settle) ? "  (reaches the next move: raise SETTLE)" : ""
        }
    }' "$1" "$2"
}

if [ "${1:-}" = --analyze ]; then   # offline: --analyze MOVES LOG [SETTLE]
    stalls "$2" "$3" "${4:-20}"
    exit 0
fi

with=yes
if [ "${1:-}" = --without-nfsreset ]; then with=no; shift; fi
v=${1:-a}
rounds=${2:-2}
settle=${SETTLE:-20}
case $v in a) home=head1 away=head2 ;; b) home=head2 away=head1 ;; *) echo "LETTER is a or b" >&2; exit 2 ;; esac
case $rounds in '' | *[!0-9]*) echo "ROUNDS must be a number" >&2; exit 2 ;; esac

on() { local host=$1; shift; vagrant ssh "$host" -c "sudo sh -c '$*'" -- -q 2>/dev/null; }

bin=/usr/bin/nfsreset   # the package's
[ $with = no ] && bin=/bin/false
echo "grp-$v: nfsreset_bin=$bin"
on "$home" "crm_resource -r vip-$v -p nfsreset_bin -v $bin >/dev/null && crm_resource --wait --timeout=60s"

duration=$(( rounds * 2 * settle + settle + 30 ))
log=/tmp/nfsr-writer-$v.log
on client "systemctl stop nfsr-writer-$v 2>/dev/null; systemd-run --quiet --unit nfsr-writer-$v --collect timeout $duration /usr/local/bin/nfsr-writer /mnt/$v $log"
sleep "$settle"

moves=()
for r in $(seq 1 "$rounds"); do
    for target in "$away" "$home"; do
        t=$(on "$home" "date +%s.%N; crm_resource --move -r grp-$v -N $target >/dev/null 2>&1; crm_resource --wait --timeout=120s; crm_resource --clear -r grp-$v >/dev/null 2>&1" | head -n 1 | tr -d '\r')
        moves+=("$t $target round-$r")
        echo "round $r: grp-$v -> $target at $t"
        sleep "$settle"
    done
done

on client "systemctl stop nfsr-writer-$v" || true
on client "cat $log" | tr -d '\r' >"/tmp/move-vip-$v.log"
echo
echo "stalls on /mnt/$v (longest gap between completed writes after each move; nfsreset: $with):"
printf '%s\n' "${moves[@]}" >"/tmp/move-vip-$v.moves"
stalls "/tmp/move-vip-$v.moves" "/tmp/move-vip-$v.log" "$settle"

[ $with = no ] && on "$home" "crm_resource -r vip-$v -p nfsreset_bin -v /usr/bin/nfsreset >/dev/null"
exit 0
