#!/usr/bin/env bash
# Object store benchmark (issue 18): the real binaries, one receiver with a
# local store and one with an S3 store (moto_server on 127.0.0.1), the same
# image. Prints the figures for BENCHMARKS.md's "Object store (issue 18)".
#
#   benches/objstore.sh [SIZE_MIB] [PROFILE]     (default: 512 debug)
#
# BENCH_LOG=FILTER keeps the receivers' logs (RUST_LOG) in BENCH_LOG_DIR.
#
#   initial sync into the object store   vs  into a local store
#   restore with a cold cache (every pack downloaded and opened)  vs  a local one
# Targets: sync >= 0.7x the local speed, cold restore >= 0.5x.
set -euo pipefail
cd "$(dirname "$0")/.."
MIB=${1:-512}
PROFILE=${2:-debug}
if [ "$PROFILE" = release ]; then cargo build --release --locked --bins -q; else cargo build --locked --bins -q; fi
BIN=$PWD/target/$PROFILE
WORK=${PILOTLIGHT_BENCH_DIR:-/tmp/pilotlight-objstore-bench}
rm -rf "$WORK"; mkdir -p "$WORK"
PIDS=()
# `run` goes in a subshell ($(...)): its receivers are known by their pid files.
cleanup() {
    for p in "${PIDS[@]}" $(cat "$WORK"/*.pid 2>/dev/null); do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null; rm -rf "$WORK"
}
trap cleanup EXIT
now() { date +%s.%N; }
secs() { echo "$2 - $1" | bc; }
ratio() { printf '%.2f' "$(echo "scale=3; $1 / $2" | bc)"; }
wait_for() { for _ in $(seq 300); do eval "$1" && return 0; sleep 0.1; done; echo "timed out: $1" >&2; exit 1; }

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
# S3_SERVER=s3s-fs: the Rust S3 server (`cargo install s3s-fs --features binary`,
# buckets are directories) instead of moto (Python), whose CPU on the same cores
# bounds the object store's figures.
if [ "${S3_SERVER:-moto}" = s3s-fs ]; then
    mkdir -p "$WORK/s3s/bench"
    s3s-fs --host 127.0.0.1 --port "$PORT" --access-key testing --secret-key testing "$WORK/s3s" >/dev/null 2>&1 &
    PIDS+=($!)
    wait_for "curl -s -o /dev/null http://127.0.0.1:$PORT/"
else
    moto_server -H 127.0.0.1 -p "$PORT" >/dev/null 2>&1 &
    PIDS+=($!)
    wait_for "curl -s -o /dev/null http://127.0.0.1:$PORT/"
    curl -s -X PUT "http://127.0.0.1:$PORT/bench" >/dev/null
fi
export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_REGION=us-east-1 AWS_ENDPOINT_URL=http://127.0.0.1:$PORT

IMG=$WORK/img
head -c $((MIB / 2 << 20)) /dev/urandom >"$IMG"
{ yes "pilotlight keeps a warm copy of every disk" || true; } | head -c $((MIB / 2 << 20)) >>"$IMG"

run() { # NAME [init args...]: sync the image into a new receiver; prints seconds
    local name=$1; shift
    "$BIN/pilotlight-receiver" init --dir "$WORK/$name" --listen 127.0.0.1:0 "$@" >/dev/null
    "$BIN/pilotlight-receiver" enroll --dir "$WORK/$name" --server b --out "$WORK/$name.pem" >/dev/null
    RUST_LOG=${BENCH_LOG:-warn} "$BIN/pilotlight-receiver" serve --dir "$WORK/$name" --listen 127.0.0.1:0 --print-addr \
        >"$WORK/$name.addr" 2>"${BENCH_LOG_DIR:-$WORK}/$name.log" &
    echo $! >"$WORK/$name.pid"
    wait_for "[ -s $WORK/$name.addr ]"
    local t0; t0=$(now)
    "$BIN/pilotlight-agent" run --receiver "$(head -1 "$WORK/$name.addr")" --identity "$WORK/$name.pem" \
        --state "$WORK/$name.state" --volume "root=$IMG" --once >/dev/null 2>&1
    secs "$t0" "$(now)"
}
restore() { # NAME: restore the latest point; prints seconds
    local t0; t0=$(now)
    "$BIN/pilotlight-receiver" restore --dir "$WORK/$1" --server b --volume root --latest --to "$WORK/$1.out" >/dev/null
    sync
    local t; t=$(secs "$t0" "$(now)")
    cmp "$IMG" "$WORK/$1.out"
    rm -f "$WORK/$1.out"
    echo "$t"
}

LOCAL_SYNC=$(run local)
S3_SYNC=$(run s3 --store s3://bench/site)
LOCAL_RESTORE=$(restore local)
rm -f "$WORK"/s3/packs/*.pack
S3_RESTORE=$(restore s3)
echo "| ${MIB} MiB, $PROFILE, ${S3_SERVER:-moto} | initial sync | local ${LOCAL_SYNC}s | object store ${S3_SYNC}s | $(ratio "$LOCAL_SYNC" "$S3_SYNC")x the local speed (target 0.7x) |"
echo "| ${MIB} MiB, $PROFILE, ${S3_SERVER:-moto} | restore, cold cache | local ${LOCAL_RESTORE}s | object store ${S3_RESTORE}s | $(ratio "$LOCAL_RESTORE" "$S3_RESTORE")x the local speed (target 0.5x) |"
