#!/usr/bin/env bash
# Many agents against one receiver (issue 15, item 5): N real agent
# processes started at once, each with a 64 MiB volume (DATA_MIB, default
# 16, of random data in 1 MiB pieces, the rest a hole) changing 1% per point
# (random 4 KiB writes), all on loopback, the receiver with its default
# budgets.
#
#   benches/many_agents.sh [AGENTS] [POINTS]      (default: 500 3)
#
# Prints, per round: wall time until every agent's point is durable, agents
# told Busy (from their logs), connection resets seen (must be 0), agents
# that gave up (must be 0); at the end every point durable (`points`), the
# receiver's peak RSS (VmHWM) and the commit latency p50/p99 (upper bounds of
# the `pilotlight_receiver_commit_seconds` histogram buckets).
# BIN=dir uses binaries from there instead of a release build.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-500}
POINTS=${2:-3}
DATA_MIB=${DATA_MIB:-16}
if [ -z "${BIN:-}" ]; then
    cargo build --release --locked --bins -q
    BIN=$PWD/target/release
fi
WORK=${PILOTLIGHT_BENCH_DIR:-/work/pilotlight-bench-many}
rm -rf "$WORK"; mkdir -p "$WORK/logs"
RPID=""
cleanup() {
    # Never stop before the rm: the work directory holds gigabytes.
    set +e
    [ -n "$RPID" ] && kill "$RPID" 2>/dev/null; wait 2>/dev/null
    # The logs of agents that saw a reset outlive the run.
    if [ -n "${KEEP_LOGS:-}" ]; then
        mkdir -p "$KEEP_LOGS"; grep -il reset "$WORK"/logs/*.log 2>/dev/null | xargs -r cp -t "$KEEP_LOGS"
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
now() { date +%s.%N; }

$BIN/pilotlight-receiver init --dir "$WORK/rcv" --listen 127.0.0.1:0 >/dev/null
echo "== enrolling $N servers, making their images"
for i in $(seq -w 1 "$N"); do
    $BIN/pilotlight-receiver enroll --dir "$WORK/rcv" --server "s$i" --out "$WORK/s$i.pem" >/dev/null
done
python3 - "$WORK" "$N" "$DATA_MIB" <<'PY'
import os, sys
work, n, data = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for i in range(1, n + 1):
    with open(f"{work}/s{i:0{len(str(n))}d}.img", "wb") as f:
        f.truncate(64 << 20)
        for k in range(min(data, 64)):  # 1 MiB pieces spread over the volume
            f.seek(k * ((64 << 20) // min(data, 64)))
            f.write(os.urandom(1 << 20))
PY
PORT=$((20000 + RANDOM % 20000))
RUST_LOG=warn $BIN/pilotlight-receiver serve --dir "$WORK/rcv" --listen 127.0.0.1:0 --print-addr \
    --metrics "127.0.0.1:$PORT" >"$WORK/addr" 2>"$WORK/receiver.log" &
RPID=$!
for _ in $(seq 100); do [ -s "$WORK/addr" ] && break; sleep 0.1; done
ADDR=$(cat "$WORK/addr")

for p in $(seq 1 "$POINTS"); do
    if [ "$p" -gt 1 ]; then
        python3 - "$WORK" "$N" <<'PY'
import os, random, sys
work, n = sys.argv[1], int(sys.argv[2])
for i in range(1, n + 1):
    with open(f"{work}/s{i:0{len(str(n))}d}.img", "r+b") as f:
        for _ in range((64 << 20) // 100 // 4096):  # 1% of the volume
            f.seek(random.randrange(0, 64 << 20, 4096))
            f.write(os.urandom(4096))
PY
    fi
    sync
    t0=$(now)
    pids=()
    for i in $(seq -w 1 "$N"); do
        RUST_LOG=warn $BIN/pilotlight-agent run --receiver "$ADDR" --identity "$WORK/s$i.pem" \
            --state "$WORK/state$i" --volume "root=$WORK/s$i.img" --once --once-attempts 1000 \
            >/dev/null 2>"$WORK/logs/s$i.$p.log" &
        pids+=($!)
    done
    failed=0
    for pid in "${pids[@]}"; do wait "$pid" || failed=$((failed + 1)); done
    t1=$(now)
    busy=$( (grep -l "connection limit" "$WORK"/logs/*."$p".log 2>/dev/null || true) | wc -l)
    resets=$( (grep -il "reset" "$WORK"/logs/*."$p".log 2>/dev/null || true) | wc -l)
    printf 'round %d: %d agents, %.1f s until every point durable, %d told Busy, %d saw a reset, %d gave up\n' \
        "$p" "$N" "$(echo "$t1 - $t0" | bc)" "$busy" "$resets" "$failed"
done

points=$($BIN/pilotlight-receiver points --dir "$WORK/rcv" --json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')
echo "points durable: $points of $((N * POINTS))"
echo "receiver peak RSS: $(awk '/VmHWM/ {printf "%.0f MiB", $2/1024}' /proc/$RPID/status)"
curl -s "http://127.0.0.1:$PORT/metrics" | python3 -c '
import sys
b = []
for line in sys.stdin:
    if line.startswith("pilotlight_receiver_commit_seconds_bucket"):
        le = line.split("le=\"")[1].split("\"")[0]
        b.append((float("inf") if le == "+Inf" else float(le), float(line.split()[-1])))
b.sort()
total = b[-1][1] if b else 0
def q(f):
    for le, c in b:
        if c >= f * total:
            return le
print("commits: %d, commit latency p50 <= %ss, p99 <= %ss" % (total, q(0.5), q(0.99)))
'
