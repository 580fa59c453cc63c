#!/usr/bin/env bash
# Resumable initial sync benchmark (issue 15): the real binaries on 127.0.0.1.
# Prints a markdown section to paste into BENCHMARKS.md ("Resumable initial sync").
#
#   benches/resume.sh [SIZE_GIB] [CHECKPOINT_MIB]      (default: 8 1024)
#
# An incompressible image of SIZE_GIB (every byte is data), then twice:
#   (a) kill -9 of the agent when its status shows 90% of the initial sync
#       read, restart (`run --once`): bytes the receiver received in all
#       (`pilotlight_receiver_bytes_received_total`) against the data;
#   (b) kill -9 of the receiver at 90%, restart on the same port; the agent
#       (continuous) reconnects: bytes it sent in all
#       (`pilotlight_agent_bytes_compressed_total`) against the data.
# Each point is restored and compared with the image (cmp).
# PILOTLIGHT_BENCH_PROFILE=debug uses target/debug (no release build);
# PILOTLIGHT_BENCH_MIB=N makes the image N MiB instead (a quick, small run).
set -euo pipefail
cd "$(dirname "$0")/.."
G=${1:-8}
CKPT=${2:-1024}
MIB=${PILOTLIGHT_BENCH_MIB:-$((G * 1024))}
# The send rate is capped so that the sync takes about 50 s: the status is
# written every second, and the kill must land near 90%, not after the end.
MBPS=$((MIB / 6 > 0 ? MIB / 6 : 1))
PROFILE=${PILOTLIGHT_BENCH_PROFILE:-release}
if [ "$PROFILE" = release ]; then
    cargo build --release --locked --bins -q
else
    cargo build --locked --bins -q
fi
BIN=$PWD/target/$PROFILE
WORK=${PILOTLIGHT_BENCH_DIR:-/work/pilotlight-resume-bench}
rm -rf "$WORK"; mkdir -p "$WORK"
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    wait 2>/dev/null; rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
metric() { curl -s "http://127.0.0.1:$1/metrics" | awk -v m="$2" '$1==m {printf "%.0f\n", $2}'; }
status_field() { python3 - "$1" "$2" <<'PY'
import json, sys
try:
    s = json.load(open(sys.argv[1] + "/status.json"))
except Exception:
    print(""); sys.exit()
v = s
for k in sys.argv[2].split("."):
    v = v.get(k) if isinstance(v, dict) else None
print("" if v is None else v)
PY
}
wait_done() { # STATE FRACTION: until the sync has read that much
    local want; want=$(python3 -c "print(int($MIB * (1<<20) * $2))")
    for _ in $(seq 100000); do
        local d; d=$(status_field "$1" sync.done_bytes)
        [ -n "$d" ] && [ "$d" -ge "$want" ] && return 0
        sleep 0.05
    done
    echo "the sync never reached $2" >&2; exit 1
}
serve() { # DIR LISTEN METRICS_PORT -> address in DIR.addr
    rm -f "$1.addr"
    RUST_LOG=warn $BIN/pilotlight-receiver serve --dir "$1" --listen "$2" --print-addr \
        --metrics "127.0.0.1:$3" >"$1.addr" &
    PIDS+=($!); RPID=$!
    for _ in $(seq 200); do [ -s "$1.addr" ] && break; sleep 0.05; done
    ADDR=$(cat "$1.addr")
}
agent() { # STATE ARGS...
    local state=$1; shift
    RUST_LOG=warn $BIN/pilotlight-agent run --receiver "$ADDR" --identity "$WORK/bench.pem" \
        --state "$state" --volume root="$IMG" --checkpoint-mib "$CKPT" --limit-mbps "$MBPS" \
        "$@" >/dev/null &
    PIDS+=($!); APID=$!
}
restore_cmp() { # DIR
    $BIN/pilotlight-receiver restore --dir "$1" --server bench --volume root --latest \
        --to "$WORK/restored" --force >/dev/null
    cmp "$IMG" "$WORK/restored" && echo byte-exact
    rm -f "$WORK/restored"
}
setup() { # DIR
    $BIN/pilotlight-receiver init --dir "$1" --listen 127.0.0.1:0 >/dev/null
    rm -f "$WORK/bench.pem"
    $BIN/pilotlight-receiver enroll --dir "$1" --server bench --out "$WORK/bench.pem" >/dev/null
}

IMG="$WORK/img"
echo "== ${MIB} MiB: incompressible image" >&2
head -c $((MIB << 20)) /dev/urandom >"$IMG"
DATA=$((MIB << 20))

# (a) kill -9 of the agent at 90%.
setup "$WORK/a"
RP=$(free_port); serve "$WORK/a" 127.0.0.1:0 "$RP"
t0=$(date +%s.%N)
agent "$WORK/a-state" --once
wait_done "$WORK/a-state" 0.9
kill -9 "$APID"; wait "$APID" 2>/dev/null || true
agent "$WORK/a-state" --once
wait "$APID"
t1=$(date +%s.%N)
A_RECV=$(metric "$RP" pilotlight_receiver_bytes_received_total)
A_OK=$(restore_cmp "$WORK/a")
kill "$RPID"; wait "$RPID" 2>/dev/null || true
rm -rf "$WORK/a" "$WORK/a-state"

# (b) kill -9 of the receiver at 90%.
setup "$WORK/b"
serve "$WORK/b" 127.0.0.1:0 "$(free_port)"
LISTEN=$ADDR
AP=$(free_port)
t2=$(date +%s.%N)
agent "$WORK/b-state" --interval 1h --metrics "127.0.0.1:$AP"
wait_done "$WORK/b-state" 0.9
kill -9 "$RPID"; wait "$RPID" 2>/dev/null || true
serve "$WORK/b" "$LISTEN" "$(free_port)"
for _ in $(seq 100000); do
    [ "$(status_field "$WORK/b-state" last_point)" = 1 ] && break
    sleep 0.1
done
t3=$(date +%s.%N)
B_SENT=$(metric "$AP" pilotlight_agent_bytes_compressed_total)
kill "$APID"; wait "$APID" 2>/dev/null || true
B_OK=$(restore_cmp "$WORK/b")

ratio() { printf '%.3f' "$(echo "scale=4; $1 / $2" | bc)"; }
cat <<MD
## Resumable initial sync (issue 15)

\`benches/resume.sh $G $CKPT\` ($PROFILE build, $(date -u +%Y-%m-%d), $(nproc) cores): a ${MIB} MiB
incompressible image, checkpoints every ${CKPT} MiB or 30 s, send rate capped at
${MBPS} Mbit/s (so that the kill lands near 90%), kill -9 at 90% of the initial
sync read (the agent's status), restart. Target: bytes in all <= 1.15x the data.

| kill -9 of | bytes in all | x data | time, start to durable | point |
|---|---:|---:|---:|---|
| agent (receiver's bytes received) | $A_RECV | $(ratio "$A_RECV" "$DATA") | $(printf '%.1f' "$(echo "$t1 - $t0" | bc)") s | $A_OK |
| receiver (agent's bytes sent) | $B_SENT | $(ratio "$B_SENT" "$DATA") | $(printf '%.1f' "$(echo "$t3 - $t2" | bc)") s | $B_OK |
MD
