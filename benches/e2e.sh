#!/usr/bin/env bash
# End-to-end benchmark: the real binaries against the tools a user would
# otherwise pick, on the same data in the same run. Writes BENCHMARKS.md.
#
#   benches/e2e.sh [SIZES_GIB...]      (default: 1 4)
#
# For each size: a mixed image (half random, a quarter zeros, a quarter text);
#   initial sync (receiver on 127.0.0.1, sync commit)  vs  dd iflag=direct | zstd -1 -T2 | zstd -d | dd conv=fsync
#   1% of 4 KiB blocks changed, incremental scan cycle  vs  rsync -I --inplace --no-whole-file
#   restore of the latest point                          vs  cp (+ sync)
# and the agent's peak memory (GNU time).
set -euo pipefail
cd "$(dirname "$0")/.."
SIZES=("${@:-1 4}")
# shellcheck disable=SC2206
SIZES=(${SIZES[*]})
cargo build --release --locked --bins -q
BIN=$PWD/target/release
WORK=${PILOTLIGHT_BENCH_DIR:-/work/pilotlight-bench}
rm -rf "$WORK"; mkdir -p "$WORK"
RPID=""
cleanup() { [ -n "$RPID" ] && kill "$RPID" 2>/dev/null; wait 2>/dev/null; rm -rf "$WORK"; }
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

ROWS=""
for G in "${SIZES[@]}"; do
    IMG="$WORK/img$G"
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
    STATE="$WORK/state$G"
    VOL="v$G"
    drop_caches
    t0=$(now)
    /usr/bin/time -f %M -o "$WORK/mem-init" $BIN/pilotlight-agent run --receiver "$ADDR" --identity "$WORK/bench.pem" \
        --state "$STATE" --volume "$VOL=$IMG" --once >/dev/null
    t1=$(now); INIT=$(secs "$t0" "$t1")
    drop_caches
    t0=$(now)
    dd if="$IMG" iflag=direct bs=4M status=none | zstd -1 -T2 -q -c | zstd -d -q -c | dd of="$WORK/copy$G" bs=4M conv=fsync status=none
    t1=$(now); DDZ=$(secs "$t0" "$t1")

    echo "== ${G} GiB: changing 1% of the 4 KiB blocks"
    python3 - "$IMG" <<'PY'
import os, random, sys
path = sys.argv[1]
size = os.path.getsize(path)
blocks = size // 4096
random.seed(1)
with open(path, "r+b") as f:
    for b in random.sample(range(blocks), blocks // 100):
        f.seek(b * 4096)
        f.write(os.urandom(4096))
    f.flush()
    os.fsync(f.fileno())
PY
    drop_caches
    t0=$(now)
    /usr/bin/time -f %M -o "$WORK/mem-inc" $BIN/pilotlight-agent run --receiver "$ADDR" --identity "$WORK/bench.pem" \
        --state "$STATE" --volume "$VOL=$IMG" --once >/dev/null
    t1=$(now); INC=$(secs "$t0" "$t1")
    drop_caches
    t0=$(now)
    rsync -I --inplace --no-whole-file "$IMG" "$WORK/copy$G"
    sync "$WORK/copy$G"
    t1=$(now); RSYNC=$(secs "$t0" "$t1")
    cmp "$IMG" "$WORK/copy$G"
    rm -f "$WORK/copy$G"

    drop_caches
    t0=$(now)
    $BIN/pilotlight-receiver restore --dir "$WORK/rcv" --server bench --volume "$VOL" --latest --to "$WORK/restored$G" >/dev/null
    t1=$(now); RESTORE=$(secs "$t0" "$t1")
    cmp "$IMG" "$WORK/restored$G"
    rm -f "$WORK/restored$G"
    drop_caches
    t0=$(now)
    cp "$IMG" "$WORK/cp$G"
    sync "$WORK/cp$G"
    t1=$(now); CP=$(secs "$t0" "$t1")
    rm -f "$WORK/cp$G"

    MEM_KB=$(sort -n "$WORK/mem-init" "$WORK/mem-inc" | tail -1)
    MEM_LIMIT_KB=$(( 256 * 1024 + G * 1024 * 1024 / 1000 ))
    printf '   initial %.2fs vs dd|zstd|dd %.2fs (%sx); 1%% cycle %.2fs vs rsync %.2fs (%sx); restore %.2fs vs cp %.2fs (%sx); agent peak %d MiB\n' \
        "$INIT" "$DDZ" "$(ratio "$INIT" "$DDZ")" "$INC" "$RSYNC" "$(ratio "$INC" "$RSYNC")" "$RESTORE" "$CP" "$(ratio "$RESTORE" "$CP")" $((MEM_KB / 1024))
    ROWS+="| ${G} GiB | initial sync | $(printf %.2f "$INIT") s | dd\|zstd\|dd $(printf %.2f "$DDZ") s | **$(ratio "$INIT" "$DDZ")x** | ≤ 1.0x (aim 0.6x) |"$'\n'
    ROWS+="| ${G} GiB | 1% changed, scan cycle | $(printf %.2f "$INC") s | rsync $(printf %.2f "$RSYNC") s | **$(ratio "$INC" "$RSYNC")x** | ≤ 0.33x (aim 0.25x) |"$'\n'
    ROWS+="| ${G} GiB | restore latest | $(printf %.2f "$RESTORE") s | cp $(printf %.2f "$CP") s | **$(ratio "$RESTORE" "$CP")x** | ≤ 1.3x (aim 1.0x) |"$'\n'
    ROWS+="| ${G} GiB | agent peak RSS | $((MEM_KB / 1024)) MiB | limit $((MEM_LIMIT_KB / 1024)) MiB | | ≤ 256 MiB + 0.1% |"$'\n'
    rm -f "$IMG"
done

# The rate cap (--limit-mbps) against the clock: 256 MiB of random data (no
# zero blocks, nothing compresses) at 400 Mbit/s should take 5.4 s; the
# paused-clock unit tests pin the arithmetic, this is the real machine.
echo "== rate cap: 256 MiB of random data at --limit-mbps 400"
head -c $((256 << 20)) /dev/urandom >"$WORK/capped"
drop_caches
t0=$(now)
$BIN/pilotlight-agent run --receiver "$ADDR" --identity "$WORK/bench.pem" \
    --state "$WORK/state-capped" --volume "capped=$WORK/capped" --once --limit-mbps 400 >/dev/null
t1=$(now); CAPPED=$(secs "$t0" "$t1")
CAP_IDEAL=$(echo "scale=3; 256 * 1048576 * 8 / 400000000" | bc)
CAP_MBPS=$(printf '%.0f' "$(echo "scale=3; 256 * 1048576 * 8 / $CAPPED / 1000000" | bc)")
printf '   rate cap 400 Mbit/s: %.2fs (%s Mbit/s achieved, ideal %.2fs)\n' "$CAPPED" "$CAP_MBPS" "$CAP_IDEAL"
ROWS+="| 256 MiB random | --limit-mbps 400 | $(printf %.2f "$CAPPED") s ($CAP_MBPS Mbit/s) | ideal $(printf %.2f "$CAP_IDEAL") s | **$(ratio "$CAPPED" "$CAP_IDEAL")x** | 1.0x to 1.1x |"$'\n'
rm -f "$WORK/capped"

CPU=$(lscpu | sed -n 's/^Model name:[[:space:]]*//p' | head -1)
{
    echo "# Benchmarks"
    echo
    echo "Measured by \`benches/e2e.sh\` on $(date -u +%Y-%m-%d): release binaries, receiver on 127.0.0.1,"
    echo "sync commit, 2 TLS streams, 64 KiB blocks, page cache dropped before every timed step"
    echo "(where the machine allows it). Ratios compare times taken in the same run on the same data."
    echo
    echo "Machine: $(nproc) cores ($CPU), $(free -g | awk '/Mem:/{print $2}') GiB RAM, Linux $(uname -r),"
    echo "filesystem $(df -T "$WORK" | awk 'NR==2{print $2}') on $(df "$WORK" | awk 'NR==2{print $1}')."
    echo
    echo "| image | step | pilotlight | baseline | ratio | target |"
    echo "|---|---|---|---|---|---|"
    printf '%s' "$ROWS"
    echo
    echo "Numbers move by 10-20% between runs on this virtual disk; ratios are what to compare."
    echo
    echo "Criterion benchmarks of the hot path (delta hashing, block encode/decode, framing):"
    echo "\`cargo bench --bench hot_path\`."
    echo
    # Sections other benchmarks write (criterion figures, live tracking) stay.
    if [ -f BENCHMARKS.md ]; then sed -n '/^## Hot path/,$p' BENCHMARKS.md; fi
} >BENCHMARKS.md.new
mv BENCHMARKS.md.new BENCHMARKS.md
echo "== wrote BENCHMARKS.md"
