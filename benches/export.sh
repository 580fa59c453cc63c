#!/usr/bin/env bash
# Instant export benchmark (issue 16): the real binaries and real NBD clients.
# Prints a markdown section to paste into BENCHMARKS.md ("Instant export").
#
#   benches/export.sh [SIZE_GIB] [POINTS] [REPS]      (default: 1 50 5)
#
# A mixed image (half random, a quarter zeros, a quarter text, as e2e.sh)
# replicated to a receiver on 127.0.0.1, then POINTS-1 more points with 200
# random 4 KiB blocks changed each. Page cache dropped before each timed step.
#   (a) from starting `pilotlight-receiver export --socket S` to the first
#       4 KiB read answered (qemu-io), for the first and the latest point;
#   (b) sequential read of the oldest and the latest point, REPS times each,
#       interleaved so that the machine's load falls on all three alike:
#       `pilotlight-receiver restore` to a file, nbdcopy to a file (+ sync)
#       over a unix socket, and over TCP loopback; median and range;
#   (c) random 4 KiB reads of the latest point (fio, nbd engine, iodepth 1):
#       p50/p99 completion latency and IOPS.
# Peak RSS (GNU time) of the export process and of restore next to each time
# (the largest of the repetitions).
#
# PILOTLIGHT_BENCH_BIN=DIR runs the binaries in DIR instead of building
# (to measure a before and an after on the same store).
# PILOTLIGHT_BENCH_BEFORE=DIR also runs DIR's export (an older build) over
# the unix socket in each repetition, interleaved with the others.
# PILOTLIGHT_BENCH_KEEP=1 keeps the receiver directory after the run, and a
# later run with the same directory, size and points reuses it (for profiling
# one step: the image and the replication are the slow part).
set -euo pipefail
cd "$(dirname "$0")/.."
G=${1:-1}
NPOINTS=${2:-50}
REPS=${3:-5}
if [ -n "${PILOTLIGHT_BENCH_BIN:-}" ]; then
    BIN=$PILOTLIGHT_BENCH_BIN
else
    cargo build --release --locked --bins -q
    BIN=$PWD/target/release
fi
WORK=${PILOTLIGHT_BENCH_DIR:-/work/pilotlight-export-bench}
KEEP=${PILOTLIGHT_BENCH_KEEP:-}
TAG="$G GiB, $NPOINTS points"
if [ -n "$KEEP" ] && [ "$(cat "$WORK/made" 2>/dev/null)" = "$TAG" ]; then
    REUSE=1
else
    REUSE=""
    rm -rf "$WORK"; mkdir -p "$WORK"
fi
RPID=""
EPID=""
cleanup() {
    [ -n "$EPID" ] && kill "$EPID" 2>/dev/null
    [ -n "$RPID" ] && kill "$RPID" 2>/dev/null
    wait 2>/dev/null
    rm -f "$WORK/img" "$WORK/copied" "$WORK/restored"
    [ -n "$KEEP" ] || rm -rf "$WORK"
}
trap cleanup EXIT

now() { date +%s.%N; }
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true; }
secs() { echo "$2 - $1" | bc; }
ratio() { printf '%.2f' "$(echo "scale=3; $1 / $2" | bc)"; }
# Median, smallest and largest of the numbers on stdin: "MED MIN MAX".
stats() { sort -g | awk '{v[NR]=$1} END {m = NR % 2 ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2; printf "%.2f %.2f %.2f\n", m, v[1], v[NR]}'; }

# The disk is shared: refuse to start without room for the image (or one
# copy of it) and the store, rather than fill it for everyone.
free_gib() { df --output=avail -BG "$WORK" | tail -1 | tr -dc 0-9; }
NEED=$((G * 2 + 1))
[ -n "$REUSE" ] && NEED=$((G + 1))
if [ "$(free_gib)" -lt "$NEED" ]; then
    echo "only $(free_gib) GiB free under $WORK, $NEED GiB needed" >&2
    exit 1
fi

if [ -z "$REUSE" ]; then
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
rm -f "$IMG"
# Replication has stopped: the timed steps below read a quiet store.
kill "$RPID"; wait "$RPID" || true; RPID=""
# Export and restore read the packs; the staging image is serve's own (and
# as large as the volume's data): not kept, to spare the shared disk.
rm -rf "$WORK/rcv/staging"
echo "$TAG" >"$WORK/made"
fi
LOAD=$(cut -d' ' -f1-3 /proc/loadavg)
read -r FIRST LATEST COUNT < <($BIN/pilotlight-receiver points --dir "$WORK/rcv" --server bench --json |
    python3 -c 'import json,sys; ids=[p["id"] for p in json.load(sys.stdin)]; print(min(ids), max(ids), len(ids))')
echo "   points $FIRST..$LATEST ($COUNT)"

# Start an export of point $1 on a unix socket, or on TCP loopback with
# $2 = tcp, under GNU time; sets EPID (the export's pid), TPID (time's) and
# URI. Returns once the URI is printed.
start_export() {
    local sock="$WORK/s$1"
    rm -f "$sock" "$WORK/uri$1"
    local how=(--socket "$sock")
    [ "${2:-}" = tcp ] && how=(--listen 127.0.0.1:0)
    RUST_LOG=warn /usr/bin/time -f %M -o "$WORK/mem-export$1" $BIN/pilotlight-receiver export --dir "$WORK/rcv" \
        --server bench --volume v --point "$1" "${how[@]}" >"$WORK/uri$1" &
    TPID=$!
    while [ ! -s "$WORK/uri$1" ]; do sleep 0.005; done
    EPID=$(pgrep -P "$TPID")
    URI=$(head -1 "$WORK/uri$1")
}
stop_export() {
    kill -TERM "$EPID"; wait "$TPID" || true; EPID=""
}

# (a) time to the first byte served.
first_byte() {
    drop_caches
    local t0 t1
    t0=$(now)
    start_export "$1"
    qemu-io -r -f raw -c 'read 0 4096' "$URI" >/dev/null
    t1=$(now)
    stop_export
    secs "$t0" "$t1"
}
TTFB_FIRST=$(first_byte "$FIRST"); MEM_TTFB_FIRST=$(cat "$WORK/mem-export$FIRST")
TTFB_LATEST=$(first_byte "$LATEST"); MEM_TTFB_LATEST=$(cat "$WORK/mem-export$LATEST")
printf '   first byte: point %s %.3fs (%d MiB), point %s %.3fs (%d MiB)\n' \
    "$FIRST" "$TTFB_FIRST" $((MEM_TTFB_FIRST / 1024)) "$LATEST" "$TTFB_LATEST" $((MEM_TTFB_LATEST / 1024))

# (b) sequential read of point $1: REPS x (restore, nbdcopy over the unix
# socket, nbdcopy over TCP), each output compared with restore's. Appends
# times to $WORK/t-{restore,unix,tcp}-$1 and peak RSS (KiB) to
# $WORK/m-{restore,unix,tcp}-$1. Outputs are compared by checksum, so that
# only one copy of the image is on disk at a time.
nbdcopy --version >"$WORK/nbdcopy-version"
BEFORE=${PILOTLIGHT_BENCH_BEFORE:-}
copy_once() {  # point, unix|tcp|before
    if [ "$2" = before ]; then
        local bin_was=$BIN
        BIN=$BEFORE
        start_export "$1"
        BIN=$bin_was
    else
        start_export "$1" "$2"
    fi
    drop_caches
    local t0 t1
    t0=$(now)
    nbdcopy "$URI" "$WORK/copied"
    sync "$WORK/copied"
    t1=$(now)
    stop_export
    secs "$t0" "$t1" >>"$WORK/t-$2-$1"
    cat "$WORK/mem-export$1" >>"$WORK/m-$2-$1"
    # Compared by checksum: the disk holds one copy at a time.
    if [ "$(cksum <"$WORK/copied")" != "$RESTORED_SUM" ]; then
        echo "nbdcopy of point $1 ($2) differs from restore" >&2
        exit 1
    fi
    rm -f "$WORK/copied"
}
sequential() {
    rm -f "$WORK"/t-*-"$1" "$WORK"/m-*-"$1"
    for r in $(seq "$REPS"); do
        drop_caches
        local t0 t1
        t0=$(now)
        /usr/bin/time -f %M -o "$WORK/mem-restore" $BIN/pilotlight-receiver restore --dir "$WORK/rcv" --server bench \
            --volume v --point "$1" --to "$WORK/restored" >/dev/null
        t1=$(now)
        secs "$t0" "$t1" >>"$WORK/t-restore-$1"
        cat "$WORK/mem-restore" >>"$WORK/m-restore-$1"
        RESTORED_SUM=$(cksum <"$WORK/restored")
        rm -f "$WORK/restored"
        copy_once "$1" unix
        copy_once "$1" tcp
        [ -z "$BEFORE" ] || copy_once "$1" before
        printf '   point %s, run %s: restore %.2fs, nbdcopy unix %.2fs, tcp %.2fs, before %.2fs\n' "$1" "$r" \
            "$(tail -1 "$WORK/t-restore-$1")" "$(tail -1 "$WORK/t-unix-$1")" "$(tail -1 "$WORK/t-tcp-$1")" \
            "$(tail -1 "$WORK/t-before-$1" 2>/dev/null || echo 0)"
    done
}
MIBS=$((G * 1024))
# Table rows for point $1 ($2 names it): medians and ranges of the times,
# and of each run's ratio restore time / nbdcopy time.
seq_rows() {
    local rm rlo rhi mem_r
    read -r rm rlo rhi < <(stats <"$WORK/t-restore-$1")
    mem_r=$(sort -n "$WORK/m-restore-$1" | tail -1)
    local kinds="unix tcp"
    [ -z "$BEFORE" ] || kinds="unix tcp before"
    for how in $kinds; do
        local cm clo chi mem_c
        read -r cm clo chi < <(stats <"$WORK/t-$how-$1")
        mem_c=$(sort -n "$WORK/m-$how-$1" | tail -1)
        # Each run's ratio (restore and nbdcopy ran back to back).
        local qm qlo qhi
        read -r qm qlo qhi < <(paste "$WORK/t-restore-$1" "$WORK/t-$how-$1" | awk '{print $1 / $2}' | stats)
        local label="over $how"
        [ "$how" = before ] && label="over unix, export before the change"
        echo "| sequential, $2, nbdcopy $label | $cm s ($clo-$chi), $(echo "$MIBS / $cm" | bc) MiB/s | $rm s ($rlo-$rhi), $((mem_r / 1024)) MiB RSS | **${qm}x** ($qlo-$qhi) | $((mem_c / 1024)) MiB | ≥ 0.8x |"
    done
}
sequential "$FIRST"; ROWS_OLD=$(seq_rows "$FIRST" "oldest point")
sequential "$LATEST"; ROWS_NEW=$(seq_rows "$LATEST" "latest point")

# (c) random 4 KiB reads.
start_export "$LATEST"
drop_caches
fio --name=randread --ioengine=nbd --uri="$URI" --rw=randread --bs=4k --iodepth=1 \
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
    echo "Measured by \`benches/export.sh $G $NPOINTS $REPS\` on $(date -u +%Y-%m-%d): release binaries, $G GiB mixed image"
    echo "(half random, a quarter zeros, a quarter text), $COUNT points (200 random 4 KiB blocks changed"
    echo "between points), page cache dropped before every timed step; sequential steps $REPS times each,"
    echo "median (range). Load average before the run: $LOAD."
    echo "Machine: $(nproc) cores ($CPU), $(free -g | awk '/Mem:/{print $2}') GiB RAM, $(head -1 "$WORK/nbdcopy-version")."
    echo
    echo "| step | pilotlight | restore | nbdcopy's speed as a share of restore's: median (range) | export peak RSS | target |"
    echo "|---|---|---|---|---|---|"
    echo "| first byte, oldest point ($FIRST of $COUNT) | $(printf %.3f "$TTFB_FIRST") s | | | $((MEM_TTFB_FIRST / 1024)) MiB | ≤ 1 s |"
    echo "| first byte, latest point ($LATEST) | $(printf %.3f "$TTFB_LATEST") s | | | $((MEM_TTFB_LATEST / 1024)) MiB | ≤ 1 s |"
    echo "$ROWS_OLD"
    echo "$ROWS_NEW"
    echo "| random 4 KiB reads, iodepth 1, 15 s | p50 $P50 µs, p99 $P99 µs, $IOPS IOPS | | | $((MEM_FIO / 1024)) MiB | reported |"
} >"$WORK/section.md"
echo
cat "$WORK/section.md"
cp "$WORK/section.md" "${PILOTLIGHT_BENCH_OUT:-/tmp/export-bench-section.md}"
