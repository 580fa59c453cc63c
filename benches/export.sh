#!/usr/bin/env bash
# Instant export benchmark (issue 16): the real binaries and real NBD clients.
# Prints a markdown section to paste into BENCHMARKS.md ("Instant export").
#
#   benches/export.sh [SIZE_GIB] [POINTS]      (default: 1 50)
#
# A mixed image (half random, a quarter zeros, a quarter text, as e2e.sh)
# replicated to a receiver on 127.0.0.1, then POINTS-1 more points with 200
# random 4 KiB blocks changed each. Page cache dropped before each timed step.
#   (a) from starting `pilotlight-receiver export --socket S` to the first
#       4 KiB read answered (qemu-io), for the first and the latest point;
#   (b) sequential read of the latest point: nbdcopy to a file (+ sync) vs
#       `pilotlight-receiver restore` of the same point, same run;
#   (c) random 4 KiB reads of the latest point (fio, nbd engine, iodepth 1):
#       p50/p99 completion latency and IOPS.
# Peak RSS (GNU time) of the export process and of restore next to each time.
set -euo pipefail
cd "$(dirname "$0")/.."
G=${1:-1}
NPOINTS=${2:-50}
cargo build --release --locked --bins -q
BIN=$PWD/target/release
WORK=${PILOTLIGHT_BENCH_DIR:-/work/pilotlight-export-bench}
rm -rf "$WORK"; mkdir -p "$WORK"
RPID=""
EPID=""
cleanup() {
    [ -n "$EPID" ] && kill "$EPID" 2>/dev/null
    [ -n "$RPID" ] && kill "$RPID" 2>/dev/null
    wait 2>/dev/null; rm -rf "$WORK"
}
trap cleanup EXIT

now() { date +%s.%N; }
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true; }
secs() { echo "$2 - $1" | bc; }
ratio() { printf '%.2f' "$(echo "scale=3; $1 / $2" | bc)"; }

$BIN/pilotlight-receiver init --dir "$WORK/rcv" --listen 127.0.0.1:0 >/dev/null
$BIN/pilotlight-receiver enroll --dir "$WORK/rcv" --server bench --out "$WORK/bench.pem" >/dev/null
RUST_LOG=warn $BIN/pilotlight-receiver serve --dir "$WORK/rcv" --listen 127.0.0.1:0 --print-addr >"$WORK/addr" &
RPID=$!
for _ in $(seq 100); do [ -s "$WORK/addr" ] && break; sleep 0.1; done
ADDR=$(cat "$WORK/addr")

IMG="$WORK/img"
echo "== ${G} GiB: generating mixed image"
python3 - "$IMG" "$G" <<'PY'
import os, sys
path, gib = sys.argv[1], int(sys.argv[2])
region = 1 << 20
text = (b"pilotlight keeps a warm copy of every disk; restores are checked byte for byte. " * 13000)[:region]
zero = bytes(region)
with open(path, "wb") as f:
    for i in range(gib * 1024):
        k = (i * 2654435761) % 4
        f.write(os.urandom(region) if k < 2 else (zero if k == 2 else text))
PY
echo "== ${G} GiB: replicating $NPOINTS points"
for p in $(seq "$NPOINTS"); do
    if [ "$p" -gt 1 ]; then
        python3 - "$IMG" "$p" <<'PY'
import os, random, sys
path = sys.argv[1]
blocks = os.path.getsize(path) // 4096
random.seed(int(sys.argv[2]))
with open(path, "r+b") as f:
    for b in random.sample(range(blocks), 200):
        f.seek(b * 4096)
        f.write(os.urandom(4096))
PY
    fi
    $BIN/pilotlight-agent run --receiver "$ADDR" --identity "$WORK/bench.pem" \
        --state "$WORK/state" --volume "v=$IMG" --once >/dev/null
done
read -r FIRST LATEST COUNT < <($BIN/pilotlight-receiver points --dir "$WORK/rcv" --server bench --json |
    python3 -c 'import json,sys; ids=[p["id"] for p in json.load(sys.stdin)]; print(min(ids), max(ids), len(ids))')
echo "   points $FIRST..$LATEST ($COUNT)"

# Start an export of point $1 on socket $WORK/s$1 under GNU time; sets EPID
# (the export's pid) and TPID (time's). Returns once the URI is printed.
start_export() {
    local sock="$WORK/s$1"
    rm -f "$sock" "$WORK/uri$1"
    RUST_LOG=warn /usr/bin/time -f %M -o "$WORK/mem-export$1" $BIN/pilotlight-receiver export --dir "$WORK/rcv" \
        --server bench --volume v --point "$1" --socket "$sock" >"$WORK/uri$1" &
    TPID=$!
    while [ ! -s "$WORK/uri$1" ]; do sleep 0.005; done
    EPID=$(pgrep -P "$TPID")
}
stop_export() {
    kill -TERM "$EPID"; wait "$TPID" || true; EPID=""
}
uri() { echo "nbd+unix:///bench/v?socket=$WORK/s$1"; }

# (a) time to the first byte served.
first_byte() {
    drop_caches
    local t0 t1
    t0=$(now)
    start_export "$1"
    qemu-io -r -f raw -c 'read 0 4096' "$(uri "$1")" >/dev/null
    t1=$(now)
    stop_export
    secs "$t0" "$t1"
}
TTFB_FIRST=$(first_byte "$FIRST"); MEM_TTFB_FIRST=$(cat "$WORK/mem-export$FIRST")
TTFB_LATEST=$(first_byte "$LATEST"); MEM_TTFB_LATEST=$(cat "$WORK/mem-export$LATEST")
printf '   first byte: point %s %.3fs (%d MiB), point %s %.3fs (%d MiB)\n' \
    "$FIRST" "$TTFB_FIRST" $((MEM_TTFB_FIRST / 1024)) "$LATEST" "$TTFB_LATEST" $((MEM_TTFB_LATEST / 1024))

# (b) sequential read: nbdcopy vs restore of the same point, for the oldest
# and the latest point. Sets COPY RESTORE MEM_COPY MEM_RESTORE.
nbdcopy --version >"$WORK/nbdcopy-version"
sequential() {
    start_export "$1"
    drop_caches
    t0=$(now)
    nbdcopy "$(uri "$1")" "$WORK/copied"
    sync "$WORK/copied"
    t1=$(now); COPY=$(secs "$t0" "$t1")
    stop_export; MEM_COPY=$(cat "$WORK/mem-export$1")
    drop_caches
    t0=$(now)
    /usr/bin/time -f %M -o "$WORK/mem-restore" $BIN/pilotlight-receiver restore --dir "$WORK/rcv" --server bench \
        --volume v --point "$1" --to "$WORK/restored" >/dev/null
    t1=$(now); RESTORE=$(secs "$t0" "$t1")
    MEM_RESTORE=$(cat "$WORK/mem-restore")
    cmp "$WORK/copied" "$WORK/restored"
    rm -f "$WORK/copied" "$WORK/restored"
    printf '   sequential, point %s: nbdcopy %.2fs (export %d MiB) vs restore %.2fs (%d MiB): nbdcopy at %sx of restore\n' \
        "$1" "$COPY" $((MEM_COPY / 1024)) "$RESTORE" $((MEM_RESTORE / 1024)) "$(ratio "$RESTORE" "$COPY")"
}
MIBS=$((G * 1024))
seq_row() {
    echo "| sequential read, $1 | nbdcopy $(printf %.2f "$COPY") s ($(echo "$MIBS / $COPY" | bc) MiB/s) | restore $(printf %.2f "$RESTORE") s ($((MEM_RESTORE / 1024)) MiB RSS) | **$(ratio "$RESTORE" "$COPY")x** of restore's speed | $((MEM_COPY / 1024)) MiB | ≥ 0.8x |"
}
sequential "$FIRST"; ROW_OLD=$(seq_row "oldest point")
sequential "$LATEST"; ROW_NEW=$(seq_row "latest point")

# (c) random 4 KiB reads.
start_export "$LATEST"
drop_caches
fio --name=randread --ioengine=nbd --uri="$(uri "$LATEST")" --rw=randread --bs=4k --iodepth=1 \
    --size="${G}G" --runtime=15 --time_based --output-format=json >"$WORK/fio.json"
stop_export; MEM_FIO=$(cat "$WORK/mem-export$LATEST")
read -r P50 P99 IOPS < <(python3 - "$WORK/fio.json" <<'PY'
import json, sys
text = open(sys.argv[1]).read()  # fio's nbd engine prints a line before the JSON
r = json.loads(text[text.index("{"):])["jobs"][0]["read"]
p = r["clat_ns"]["percentile"]
print(f'{p["50.000000"] / 1000:.0f} {p["99.000000"] / 1000:.0f} {r["iops"]:.0f}')
PY
)
printf '   random 4 KiB: p50 %s us, p99 %s us, %s IOPS (export %d MiB)\n' "$P50" "$P99" "$IOPS" $((MEM_FIO / 1024))

CPU=$(lscpu | sed -n 's/^Model name:[[:space:]]*//p' | head -1)
{
    echo "Measured by \`benches/export.sh $G $NPOINTS\` on $(date -u +%Y-%m-%d): release binaries, $G GiB mixed image"
    echo "(half random, a quarter zeros, a quarter text), $COUNT points (200 random 4 KiB blocks changed"
    echo "between points), export on a unix socket, page cache dropped before every timed step."
    echo "Machine: $(nproc) cores ($CPU), $(free -g | awk '/Mem:/{print $2}') GiB RAM, $(cat "$WORK/nbdcopy-version" | head -1)."
    echo
    echo "| step | pilotlight | baseline | ratio | export peak RSS | target |"
    echo "|---|---|---|---|---|---|"
    echo "| first byte, oldest point ($FIRST of $COUNT) | $(printf %.3f "$TTFB_FIRST") s | | | $((MEM_TTFB_FIRST / 1024)) MiB | ≤ 1 s |"
    echo "| first byte, latest point ($LATEST) | $(printf %.3f "$TTFB_LATEST") s | | | $((MEM_TTFB_LATEST / 1024)) MiB | ≤ 1 s |"
    echo "$ROW_OLD"
    echo "$ROW_NEW"
    echo "| random 4 KiB reads, iodepth 1, 15 s | p50 $P50 µs, p99 $P99 µs, $IOPS IOPS | | | $((MEM_FIO / 1024)) MiB | reported |"
} >"$WORK/section.md"
echo
cat "$WORK/section.md"
cp "$WORK/section.md" "${PILOTLIGHT_BENCH_OUT:-/tmp/export-bench-section.md}"
