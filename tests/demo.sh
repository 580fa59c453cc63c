#!/usr/bin/env bash
# The main job of pilotlight, end to end, on this machine: a receiver on
# 127.0.0.1, an agent replicating a generated sample image, a change, a second
# point, and a restore of the first point checked byte for byte.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== building (release)"
cargo build --release --locked --bins -q
BIN=target/release
WORK=$(mktemp -d /tmp/pilotlight-demo.XXXXXX)
RPID=""
cleanup() {
    [ -n "$RPID" ] && kill "$RPID" 2>/dev/null && wait "$RPID" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT
START=$(date +%s.%N)

echo "== receiver: init, enroll server 'demo', serve on 127.0.0.1"
$BIN/pilotlight-receiver init --dir "$WORK/receiver" --listen 127.0.0.1:0 >/dev/null
$BIN/pilotlight-receiver enroll --dir "$WORK/receiver" --server demo --out "$WORK/demo.pem" >/dev/null
RUST_LOG=warn $BIN/pilotlight-receiver serve --dir "$WORK/receiver" --listen 127.0.0.1:0 --print-addr >"$WORK/addr" &
RPID=$!
for _ in $(seq 100); do [ -s "$WORK/addr" ] && break; sleep 0.1; done
ADDR=$(cat "$WORK/addr")
[ -n "$ADDR" ] || { echo "receiver did not start" >&2; exit 1; }
echo "   listening on $ADDR"

echo "== sample image: 256 MiB (half random, a quarter text, a quarter zeros)"
IMG="$WORK/disk.img"
head -c 128M /dev/urandom >"$IMG"
{ yes "pilotlight keeps a warm copy of every disk; restores are checked byte for byte." || true; } | head -c 64M >>"$IMG"
truncate -s 256M "$IMG"

agent() {
    RUST_LOG=warn $BIN/pilotlight-agent run --receiver "$ADDR" --identity "$WORK/demo.pem" \
        --state "$WORK/agent-state" --volume "root=$IMG" --once
}
P1=$(agent)
cp "$IMG" "$WORK/at-point-$P1.img"
echo "== point $P1 durable (initial sync)"

echo "== changing 500 random 4 KiB blocks"
for _ in $(seq 500); do
    dd if=/dev/urandom of="$IMG" bs=4096 count=1 seek=$(( (RANDOM * 32768 + RANDOM) % 65536 )) conv=notrunc status=none
done
P2=$(agent)
echo "== point $P2 durable (incremental)"
$BIN/pilotlight-receiver points --dir "$WORK/receiver"

echo "== restoring point $P1 and the latest point"
$BIN/pilotlight-receiver restore --dir "$WORK/receiver" --server demo --volume root --point "$P1" --to "$WORK/restored-$P1.img"
$BIN/pilotlight-receiver restore --dir "$WORK/receiver" --server demo --volume root --latest --to "$WORK/restored-latest.img"
cmp "$WORK/restored-latest.img" "$IMG"
$BIN/pilotlight-receiver verify --dir "$WORK/receiver"
cmp "$WORK/restored-$P1.img" "$WORK/at-point-$P1.img"
END=$(date +%s.%N)
printf '== done in %.1f s (after the build)\n' "$(echo "$END - $START" | bc)"
echo "restored image of point $P1 matches the source at that point byte for byte"
