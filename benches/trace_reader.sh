#!/usr/bin/env bash
# The tracer's own cost: the agent's CPU time (utime + stime of
# /proc/PID/stat) per MB written, reading the trace with the text
# trace_pipe (PILOTLIGHT_TRACE_TEXT=1) against the raw per-CPU pages, in
# adjacent runs: ROUNDS (default 2) rounds of text then raw, each a steady
# fio random 4 KiB O_DIRECT write load at RATE (default 20m) for RUNTIME s
# (default 20) on ext4 on a loop device, --track trace, freeze
# consistency, 1 s interval, as benches/trace.sh runs it.
#
#   benches/trace_reader.sh [RUNTIME_SECS]    (needs root, fio)
#
# AGENT_BIN: the agent binary (default target/release/pilotlight-agent,
# built here); RECEIVER_BIN: the receiver (default target/debug's: its
# speed does not enter the agent's CPU time). Prints a table.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNTIME=${1:-20}
ROUNDS=${ROUNDS:-2}
RATE=${RATE:-20m}
if [ -z "${AGENT_BIN:-}" ]; then
    cargo build --release --locked -p pilotlight-agent --bin pilotlight-agent -q
    AGENT_BIN=$PWD/target/release/pilotlight-agent
fi
RECEIVER_BIN=${RECEIVER_BIN:-$PWD/target/debug/pilotlight-receiver}
WORK=${PILOTLIGHT_BENCH_DIR:-/work/pilotlight-trace-reader-bench}
RCV=/dev/shm/pilotlight-trace-reader-rcv
rm -rf "$WORK" "$RCV"; mkdir -p "$WORK/mnt"
RPID=""; APID=""; DEV=""
cleanup() {
    [ -n "$APID" ] && kill "$APID" 2>/dev/null
    [ -n "$RPID" ] && kill "$RPID" 2>/dev/null
    wait 2>/dev/null || true
    umount "$WORK/mnt" 2>/dev/null || true
    [ -n "$DEV" ] && losetup -d "$DEV" 2>/dev/null
    rm -rf "$WORK" "$RCV"
}
trap cleanup EXIT
truncate -s 1G "$WORK/src.img"
DEV=$(losetup -f --show --direct-io=on "$WORK/src.img")
mkfs.ext4 -q -F -b 4096 "$DEV"
mount "$DEV" "$WORK/mnt"
$RECEIVER_BIN init --dir "$RCV" --listen 127.0.0.1:0 >/dev/null
$RECEIVER_BIN enroll --dir "$RCV" --server bench --out "$WORK/bench.pem" >/dev/null
RUST_LOG=warn nice -n 19 $RECEIVER_BIN serve --dir "$RCV" --listen 127.0.0.1:0 --print-addr >"$WORK/addr" &
RPID=$!
for _ in $(seq 100); do [ -s "$WORK/addr" ] && break; sleep 0.1; done
ADDR=$(cat "$WORK/addr")
fio --name=steady --directory="$WORK/mnt" --rw=write --bs=1M --size=256M --direct=1 \
    --output-format=terse >/dev/null
sync

status() { $AGENT_BIN status --state "$WORK/state" --json 2>/dev/null || echo '{}'; }
start_agent() { # text|raw
    local env=()
    [ "$1" = text ] && env=(PILOTLIGHT_TRACE_TEXT=1)
    env "${env[@]}" RUST_LOG=info $AGENT_BIN run --receiver "$ADDR" --identity "$WORK/bench.pem" \
        --state "$WORK/state" --volume "root=$DEV" --track trace \
        --consistency "freeze:$WORK/mnt" --interval 1s 2>>"$WORK/agent-$1.log" &
    APID=$!
    for _ in $(seq 600); do
        status | python3 -c 'import json,sys; s=json.load(sys.stdin); sys.exit(0 if s.get("state")=="continuous" else 1)' && break
        sleep 0.2
    done
}
stop_agent() { kill "$APID"; wait "$APID" 2>/dev/null || true; APID=""; }
caught_up() {
    local since
    since=$(date +%s%3N)
    for _ in $(seq 1500); do
        status | python3 -c 'import json,sys; s=json.load(sys.stdin); sys.exit(0 if s.get("backlog_bytes")==0 and s.get("pending_points")==0 and (s.get("collected_ms") or 0)>int(sys.argv[1]) else 1)' "$since" && return
        sleep 0.2
    done
}
cpu_ticks() { awk '{print $14 + $15}' "/proc/$APID/stat"; }
TICK=$(getconf CLK_TCK)
ROWS=""
run() { # text|raw -> a row
    start_agent "$1"
    caught_up
    local c0 c1 bytes
    c0=$(cpu_ticks)
    bytes=$(fio --name=steady --directory="$WORK/mnt" --rw=randwrite --bs=4k --size=256M \
        --direct=1 --ioengine=libaio --iodepth=4 --time_based --runtime="$RUNTIME" \
        --rate="$RATE" --output-format=json | python3 -c \
        'import json,sys; print(json.load(sys.stdin)["jobs"][0]["write"]["io_bytes"])')
    caught_up
    c1=$(cpu_ticks)
    stop_agent
    grep -q "text trace_pipe" "$WORK/agent-$1.log" && reader=text || reader=raw
    ROWS+=$(python3 -c "
import sys
c, b, t = ($c1 - $c0) / $TICK, $bytes / 1e6, '$1'
print(f'| {t} ($reader) | {b:.0f} MB | {c:.2f} s | {1000 * c / b:.1f} ms |')")$'\n'
    : >"$WORK/agent-$1.log"
}
LOAD=$(uptime | sed 's/.*load average: //')
for i in $(seq "$ROUNDS"); do
    echo "== round $i: text" >&2; run text
    echo "== round $i: raw" >&2; run raw
done
echo "fio randwrite 4 KiB O_DIRECT at $RATE/s for $RUNTIME s per run; load average before: $LOAD; after: $(uptime | sed 's/.*load average: //')"
echo
echo "| reader | written | agent CPU (user+sys) | CPU per MB |"
echo "|---|---|---|---|"
printf '%s' "$ROWS"
