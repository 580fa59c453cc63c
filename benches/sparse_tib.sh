#!/usr/bin/env bash
# A 1 TiB sparse image holding DATA_GIB of random data (issue 15, item 3):
# the time to read just its data extents (`cat` of each, page cache dropped)
# beside the agent's initial sync, a no-change scan cycle, and a cycle after
# 64 MiB of the data were punched out (sent as runs of zero blocks), with
# the agent's and the receiver's peak RSS.
#
#   benches/sparse_tib.sh [DATA_GIB]      (default: 2)
#
# BIN=dir uses binaries from there instead of a release build.
set -euo pipefail
cd "$(dirname "$0")/.."
G=${1:-2}
if [ -z "${BIN:-}" ]; then
    cargo build --release --locked --bins -q
    BIN=$PWD/target/release
fi
WORK=${PILOTLIGHT_BENCH_DIR:-/work/pilotlight-bench-sparse}
rm -rf "$WORK"; mkdir -p "$WORK"
RPID=""
cleanup() { set +e; [ -n "$RPID" ] && kill "$RPID" 2>/dev/null; wait 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT
now() { date +%s.%N; }
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true; }
secs() { printf '%.2f' "$(echo "$2 - $1" | bc)"; }

IMG=$WORK/tib.img
truncate -s 1T "$IMG"
# 16 pieces of data spread over the whole TiB, the first at 0, the last at the end.
PIECE=$((G * 1024 / 16))
for k in $(seq 0 15); do
    off=$(( k * ((1024 * 1024 - PIECE) / 15) ))
    head -c "$((PIECE << 20))" /dev/urandom | dd of="$IMG" bs=1M seek="$off" conv=notrunc status=none
done

$BIN/pilotlight-receiver init --dir "$WORK/rcv" --listen 127.0.0.1:0 >/dev/null
$BIN/pilotlight-receiver enroll --dir "$WORK/rcv" --server tib --out "$WORK/tib.pem" >/dev/null
RUST_LOG=warn $BIN/pilotlight-receiver serve --dir "$WORK/rcv" --listen 127.0.0.1:0 --print-addr >"$WORK/addr" &
RPID=$!
for _ in $(seq 100); do [ -s "$WORK/addr" ] && break; sleep 0.1; done
ADDR=$(cat "$WORK/addr")

drop_caches
t0=$(now)
python3 - "$IMG" <<'PY'
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
at, end = 0, os.fstat(fd).st_size
while at < end:
    try:
        start = os.lseek(fd, at, os.SEEK_DATA)
    except OSError:
        break
    stop = os.lseek(fd, start, os.SEEK_HOLE)
    os.lseek(fd, start, os.SEEK_SET)
    left = stop - start
    while left > 0:
        n = len(os.read(fd, min(left, 8 << 20)))
        if n == 0:
            break
        left -= n
    at = stop
PY
t1=$(now); CAT=$(secs "$t0" "$t1")

cycle() {
    drop_caches
    local t0 t1
    t0=$(now)
    RUST_LOG=warn /usr/bin/time -f %M -o "$WORK/mem" $BIN/pilotlight-agent run --receiver "$ADDR" --identity "$WORK/tib.pem" \
        --state "$WORK/state" --volume "root=$IMG" --once >/dev/null
    t1=$(now)
    echo "$(secs "$t0" "$t1") s, agent peak RSS $(( $(cat "$WORK/mem") / 1024 )) MiB"
}
echo "read the data extents (cat): $CAT s"
echo "initial sync: $(cycle)"
echo "no-change cycle: $(cycle)"
fallocate --punch-hole --offset 0 --length $((64 << 20)) "$IMG"
echo "cycle after 64 MiB punched out: $(cycle)"
echo "receiver peak RSS: $(awk '/VmHWM/ {printf "%.0f MiB", $2/1024}' /proc/$RPID/status)"
