#!/usr/bin/env bash
# Live tracking benchmark (--track trace, freeze consistency, default flags:
# 64 KiB blocks) on ext4 on a loop device, with the release binaries and a
# receiver on 127.0.0.1:
#
#   1. steady fio random 4 KiB writes (O_DIRECT) at 5 and 20 MB/s for
#      RUNTIME s each with the agent: its lag (age of the oldest write not
#      yet durable), sampled from status.json every 100 ms (plus the age of
#      the status when sampled), p50/p99; freeze
#      durations (p50/p99/max); bytes the agent read per byte the tracer saw
#      written. Once with partial blocks (the default), then with
#      --partial-blocks off (whole blocks), adjacent;
#   2. PAIRS (default 3) pairs of unthrottled fio runs of RUNTIME s, the
#      agent stopped (SIGSTOP) then replicating (default --max-lag 30s):
#      foreground IOPS ratio per pair and their median (aim >= 0.9), the
#      lag and the intervals the agent deferred points;
#   3. PAIRS pairs at a steady half of the disk's IOPS (half the median
#      of step 2 with the agent stopped): IOPS ratio (aim >= 0.97).
#
#   benches/trace.sh [RUNTIME_SECS]    (default 20; needs root, fio)
#
# Appends a dated update at the end of BENCHMARKS.md's live tracking section
# (before the trace:end marker) and prints it.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNTIME=${1:-20}
PAIRS=${PAIRS:-3}
LOAD=$(uptime | sed 's/.*load average: //')
# PILOTLIGHT_BIN_DIR: binaries already built elsewhere (the update says
# which); by default the release binaries, built here.
if [ -n "${PILOTLIGHT_BIN_DIR:-}" ]; then
    BIN=$PILOTLIGHT_BIN_DIR
    BUILD="the binaries of $BIN (not a release build: lag and freeze figures are not comparable)"
else
    cargo build --release --locked --bins -q
    BIN=$PWD/target/release
    BUILD="release binaries"
fi
WORK=${PILOTLIGHT_BENCH_DIR:-/work/pilotlight-trace-bench}
# The receiver stands in for a staging host of its own: its store is in
# memory, off the disk the source volume lives on.
RCV=${PILOTLIGHT_BENCH_RCV_DIR:-/dev/shm/pilotlight-trace-bench-rcv}
rm -rf "$WORK" "$RCV"; mkdir -p "$WORK/mnt"
RPID=""; APID=""; DEV=""
cleanup() {
    [ -n "$APID" ] && kill "$APID" 2>/dev/null
    [ -n "$RPID" ] && kill "$RPID" 2>/dev/null
    wait 2>/dev/null || true
    cp "$WORK/agent.log" /tmp/pilotlight-trace-bench-agent.log 2>/dev/null || true
    umount "$WORK/mnt" 2>/dev/null || true
    [ -n "$DEV" ] && losetup -d "$DEV" 2>/dev/null
    rm -rf "$WORK" "$RCV"
}
trap cleanup EXIT

truncate -s 2G "$WORK/src.img"
# Direct I/O to the backing file: fio's writes and the agent's reads meet at
# the disk, as on a real one, and no dirty page cache of the backing file
# carries over from one run to the next (it made baselines swing 2x).
DEV=$(losetup -f --show --direct-io=on "$WORK/src.img")
mkfs.ext4 -q -F -b 4096 "$DEV"
mount "$DEV" "$WORK/mnt"
$BIN/pilotlight-receiver init --dir "$RCV" --listen 127.0.0.1:0 >/dev/null
$BIN/pilotlight-receiver enroll --dir "$RCV" --server bench --out "$WORK/bench.pem" >/dev/null
# ...and it runs at the lowest CPU priority, so that it takes only cycles the
# source host would not use.
RUST_LOG=warn nice -n 19 $BIN/pilotlight-receiver serve --dir "$RCV" --listen 127.0.0.1:0 --print-addr >"$WORK/addr" &
RPID=$!
for _ in $(seq 100); do [ -s "$WORK/addr" ] && break; sleep 0.1; done
ADDR=$(cat "$WORK/addr")

fio_job() { # RATE (empty = unthrottled; NNNiops = that many IOPS) -> IOPS
    local rate=()
    case "$1" in
    "") ;;
    *iops) rate=(--rate_iops="${1%iops}") ;;
    *) rate=(--rate="$1") ;;
    esac
    sync
    fio --name=steady --directory="$WORK/mnt" --rw=randwrite --bs=4k --size=512M \
        --direct=1 --ioengine=libaio --iodepth=4 --time_based --runtime="$RUNTIME" \
        "${rate[@]}" --output-format=json | python3 -c \
        'import json,sys; print(round(json.load(sys.stdin)["jobs"][0]["write"]["iops"]))'
}
# Lay the file out first, so that every measured run overwrites.
fio --name=steady --directory="$WORK/mnt" --rw=write --bs=1M --size=512M --direct=1 \
    --output-format=terse >/dev/null
sync

status() { $BIN/pilotlight-agent status --state "$WORK/state" --json 2>/dev/null || echo '{}'; }
start_agent() { # on|off: partial blocks
    # As deploy/pilotlight-agent.service runs it: Nice=5, best-effort I/O priority 7.
    RUST_LOG=info nice -n 5 ionice -c2 -n7 $BIN/pilotlight-agent run --receiver "$ADDR" --identity "$WORK/bench.pem" \
        --state "$WORK/state" --volume "root=$DEV" --track trace --partial-blocks "$1" \
        --consistency "freeze:$WORK/mnt" --interval 1s 2>>"$WORK/agent.log" &
    APID=$!
    for _ in $(seq 600); do
        status | python3 -c 'import json,sys; s=json.load(sys.stdin); sys.exit(0 if s.get("state")=="continuous" else 1)' && break
        sleep 0.2
    done
}
stop_agent() {
    kill "$APID"; wait "$APID" 2>/dev/null || true; APID=""
}
counters() { # -> "tracked_read traced_write"
    status | python3 -c 'import json,sys; t=json.load(sys.stdin).get("tracking") or {}; print(t.get("tracked_read_bytes_total",0), t.get("traced_write_bytes_total",0))'
}
caught_up() { # wait (at most 5 min) until everything written before now is durable
    local since
    since=$(date +%s%3N)
    for _ in $(seq 1500); do
        status | python3 -c 'import json,sys; s=json.load(sys.stdin); sys.exit(0 if s.get("backlog_bytes")==0 and s.get("pending_points")==0 and (s.get("collected_ms") or 0)>int(sys.argv[1]) else 1)' "$since" && return
        sleep 0.2
    done
}
measure() { # RATE -> "p50 p99 samples max" of lag (s) while fio runs at RATE (its IOPS in $WORK/iops)
    local samples="$WORK/lag-$1"
    : >"$samples"
    fio_job "$1" >"$WORK/iops" &
    local fpid=$!
    while kill -0 "$fpid" 2>/dev/null; do
        # The lag as of now: a status written a while ago (a long cycle
        # rewrites it only between rounds) is older by its age.
        status | python3 -c 'import json,sys,time,datetime as d; s=json.load(sys.stdin); l=s.get("lag_seconds"); u=s.get("updated"); age=max(0.0, time.time()-d.datetime.fromisoformat(u.replace("Z","+00:00")).timestamp()) if u else 0.0; print("" if l is None else l+age)' >>"$samples"
        sleep 0.1
    done
    wait "$fpid"
    python3 - "$samples" <<'EOF'
import sys
v = sorted(float(x) for x in open(sys.argv[1]) if x.strip())
q = lambda p: v[min(len(v) - 1, int(p * len(v)))] if v else float("nan")
print(f"{q(0.5):.2f} {q(0.99):.2f} {len(v)} {q(1.0):.2f}")
EOF
}
FREEZE_PY=$(cat <<'EOF'
import sys
v = sorted(float(x) for x in sys.stdin if x.strip())
q = lambda p: v[min(len(v) - 1, int(p * len(v)))] if v else float("nan")
print(f"{q(0.5):.0f} {q(0.99):.0f} {q(1.0):.0f} {len(v)}")
EOF
)
freeze_stats() { # FIELD < log lines -> "p50 p99 max count" of FIELD (frozen_ms, fifreeze_ms)
    sed 's/\x1b\[[0-9;]*m//g' | grep -o " $1=[0-9.]*" | cut -d= -f2 | python3 -c "$FREEZE_PY"
}
STEADY=""
steady() { # MODE RATE: one steady run, as a row of the table
    local m0 m1 r0 w0 r1 w1 l50 l99 n f50 f99 fmax fn i99 ratio
    read -r r0 w0 < <(counters)
    m0=$(wc -l <"$WORK/agent.log")
    read -r l50 l99 n _ < <(measure "$2")
    caught_up
    m1=$(wc -l <"$WORK/agent.log")
    read -r r1 w1 < <(counters)
    read -r f50 f99 fmax fn < <(sed -n "$((m0 + 1)),${m1}p" "$WORK/agent.log" | freeze_stats frozen_ms)
    read -r _ i99 _ _ < <(sed -n "$((m0 + 1)),${m1}p" "$WORK/agent.log" | freeze_stats fifreeze_ms)
    ratio=$(python3 -c "print(f'{($r1 - $r0) / max(1, $w1 - $w0):.2f}')")
    STEADY+="| $1 | steady ${2%m} MB/s | ${l50} s | ${l99} s | ${f50} ms | ${f99} ms | ${fmax} ms | ${i99} ms | ${fn} | ${ratio} |"$'\n'
}

echo "== starting the agent"
: >"$WORK/agent.log"
start_agent on
caught_up
for mode in on off; do
    if [ "$mode" = off ]; then stop_agent; start_agent off; caught_up; fi
    echo "== partial blocks $mode: steady 5 MB/s"
    steady "$mode" 5m
    echo "== partial blocks $mode: steady 20 MB/s"
    steady "$mode" 20m
done
stop_agent
start_agent on
caught_up

# The disk's baseline drifts a lot between runs here: pairs of adjacent
# runs, the agent stopped (SIGSTOP: it takes no CPU and reads nothing; the
# kernel still records the writes for it) and then replicating; the median
# of the pairs' ratios.
deferred() { status | python3 -c 'import json,sys; t=json.load(sys.stdin).get("tracking") or {}; print(t.get("deferred_intervals_total",0))'; }
ROWS=""; RATIOS=""; STOPPED=""
for i in $(seq "$PAIRS"); do
    echo "== pair $i: fio with the agent stopped, then replicating"
    kill -STOP "$APID"
    w0=$(fio_job "")
    kill -CONT "$APID"
    caught_up
    d0=$(deferred)
    read -r _ l99 _ lmax < <(measure "")
    w1=$(cat "$WORK/iops")
    d1=$(deferred)
    caught_up
    r=$(python3 -c "print(f'{$w1 / $w0:.3f}')")
    ROWS+="| $i | $w0 | $w1 | $r | ${l99} s | ${lmax} s | $((d1 - d0)) |"$'\n'
    RATIOS+="$r "
    STOPPED+="$w0 "
done
RATIO=$(python3 -c "import statistics,sys; print(f'{statistics.median(float(x) for x in sys.argv[1:]):.3f}')" $RATIOS)
# A steady half of the disk's IOPS (half the median with the agent stopped):
# what fio achieves with the agent replicating against the agent stopped.
HALF=$(python3 -c "import statistics,sys; print(int(statistics.median(float(x) for x in sys.argv[1:]) / 2))" $STOPPED)
HROWS=""; HRATIOS=""
for i in $(seq "$PAIRS"); do
    echo "== half pair $i: fio at $HALF IOPS with the agent stopped, then replicating"
    kill -STOP "$APID"
    w0=$(fio_job "${HALF}iops")
    kill -CONT "$APID"
    caught_up
    read -r _ l99 _ lmax < <(measure "${HALF}iops")
    w1=$(cat "$WORK/iops")
    caught_up
    r=$(python3 -c "print(f'{$w1 / $w0:.3f}')")
    HROWS+="| $i | $w0 | $w1 | $r | ${l99} s | ${lmax} s |"$'\n'
    HRATIOS+="$r "
done
stop_agent
HRATIO=$(python3 -c "import statistics,sys; print(f'{statistics.median(float(x) for x in sys.argv[1:]):.3f}')" $HRATIOS)

UPDATE=$(cat <<EOF

### Update $(date -u +%Y-%m-%d): partial blocks (issue 19)

\`benches/trace.sh $RUNTIME\` (PAIRS=$PAIRS), ${BUILD}, with default flags (64 KiB blocks): ext4 (4 KiB blocks) on a 2 GiB
loop device (direct I/O to its backing file), \`--consistency freeze\`, 1 s interval, receiver
on 127.0.0.1 (nice 19, store in /dev/shm); fio random 4 KiB O_DIRECT writes (libaio, iodepth 4)
to a 512 MiB file, ${RUNTIME} s per run. Load average before the run: ${LOAD}. "read/written" is
the change of the agent's \`tracked_read_bytes_total\` over that of \`traced_write_bytes_total\`
across the run (bytes read, the frozen delta included, per byte the tracer saw written, ext4's
journal included). "FIFREEZE call" is the kernel's freeze call alone (ext4 commits and
checkpoints its journal and flushes the disk's cache), part of each freeze. "off" is \`--partial-blocks off\` (whole blocks), run right after "on".

| partial blocks | workload | lag p50 | lag p99 | freeze p50 | freeze p99 | freeze max | FIFREEZE call p99 | points | read/written |
|---|---|---|---|---|---|---|---|---|---|
${STEADY}
At saturation (default \`--max-lag 30s\`; lag and deferred intervals of the replicating run):

| foreground fio (unthrottled), pair | IOPS, agent stopped | IOPS, agent replicating | ratio | lag p99 | lag max | intervals deferred |
|---|---|---|---|---|---|---|
${ROWS}
Median ratio: **${RATIO}** (aim ≥ 0.9 with lag ≤ 30 s).

At a steady half of the disk's IOPS (${HALF} IOPS, half the median above with the agent stopped):

| foreground fio at ${HALF} IOPS, pair | IOPS, agent stopped | IOPS, agent replicating | ratio | lag p99 | lag max |
|---|---|---|---|---|---|
${HROWS}
Median ratio: **${HRATIO}** (aim ≥ 0.97).
EOF
)
python3 - "$UPDATE" <<'EOF'
import sys
update = sys.argv[1].strip("\n")
text = open("BENCHMARKS.md").read()
marker = "<!-- trace:end -->"
if marker in text:
    text = text.replace(marker, update + "\n" + marker, 1)
else:
    text = text.rstrip("\n") + "\n\n" + update + "\n"
open("BENCHMARKS.md", "w").write(text)
EOF
echo "$UPDATE"
