#!/usr/bin/env bash
# Fail back by delta (issue 17): the real binaries over TLS on 127.0.0.1.
# Prints a markdown section to paste into BENCHMARKS.md ("Fail back by
# delta (issue 17)").
#
#   benches/failback.sh [SIZE_GIB]      (default: 4)
#
# PILOTLIGHT_BENCH_PROFILE=debug uses the dev build (dependencies at
# opt-level 2, as Cargo.toml sets) instead of building a release;
# PILOTLIGHT_BENCH_BIN=DIR uses the binaries in DIR as they are.
#
# A mixed image (half random, a quarter zeros, a quarter text, as e2e.sh
# and export.sh) replicated to a receiver, then, page cache dropped before
# each timed step:
#   (a) `pilotlight-receiver restore` of the point to a new file (local);
#   (b) that file with 1% of its 64 KiB blocks overwritten (random data):
#       `pilotlight-agent restore` by delta: bytes on the wire (both ways,
#       TLS included) vs the differing blocks of the point compressed
#       (zstd -1 each, as stored), time vs (a) and vs (c);
#   (c) the file overwritten entirely with random data: `pilotlight-agent
#       restore` (every block fetched) vs (a);
#   (d) rsync --inplace --no-whole-file of the same 1% change (both ends
#       local): bytes it sent and its time.
# Also: the time to read the whole target alone (what a delta restore
# that must hash the target cannot go under), and peak RSS (agent per
# restore, receiver over the run).
set -euo pipefail
cd "$(dirname "$0")/.."
G=${1:-4}
PROFILE=${PILOTLIGHT_BENCH_PROFILE:-release}
if [ -n "${PILOTLIGHT_BENCH_BIN:-}" ]; then
    BIN=$PILOTLIGHT_BENCH_BIN
else
    if [ "$PROFILE" = release ]; then
        cargo build --release --locked --bins -q
    else
        cargo build --locked --bins -q
    fi
    BIN=$PWD/target/$PROFILE
fi
WORK=${PILOTLIGHT_BENCH_DIR:-/work/pilotlight-failback-bench}
rm -rf "$WORK"; mkdir -p "$WORK"
RPID=""
cleanup() { [ -n "$RPID" ] && kill "$RPID" 2>/dev/null; wait 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT

now() { date +%s.%N; }
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true; }
secs() { echo "$2 - $1" | bc; }
ratio() { printf '%.2f' "$(echo "scale=3; $1 / $2" | bc)"; }
json() { python3 -c "import json,sys; print(json.load(open('$1'))['$2'])"; }

$BIN/pilotlight-receiver init --dir "$WORK/rcv" --listen 127.0.0.1:0 >/dev/null
$BIN/pilotlight-receiver enroll --dir "$WORK/rcv" --server bench --out "$WORK/bench.pem" >/dev/null
RUST_LOG=warn $BIN/pilotlight-receiver serve --dir "$WORK/rcv" --listen 127.0.0.1:0 --print-addr >"$WORK/addr" &
RPID=$!
for _ in $(seq 100); do [ -s "$WORK/addr" ] && break; sleep 0.1; done
ADDR=$(cat "$WORK/addr")

IMG="$WORK/img"
T="$WORK/target"
echo "== ${G} GiB: generating a mixed image and replicating it"
python3 - "$IMG" "$G" <<'PY'
import os, sys
path, gib = sys.argv[1], int(sys.argv[2])
region = 1 << 20
text = (b"pilotlight keeps a warm copy of every disk; restores are checked byte for byte. " * 13000)[:region]
with open(path, "wb") as f:
    for i in range(gib * 1024):
        k = (i * 2654435761) % 4
        if k == 2:
            f.seek(region, 1)  # zeros, as a hole
        else:
            f.write(os.urandom(region) if k < 2 else text)
    f.truncate()
PY
$BIN/pilotlight-agent run --receiver "$ADDR" --identity "$WORK/bench.pem" \
    --state "$WORK/state" --volume "v=$IMG" --once >/dev/null
# A network restore onto $T: its report in $1, the agent's peak RSS (KiB)
# in $1.rss.
restore_net() {
    drop_caches
    /usr/bin/time -f %M -o "$1.rss" $BIN/pilotlight-agent restore --receiver "$ADDR" \
        --identity "$WORK/bench.pem" --volume v --latest --to "$T" --json >"$1"
    cmp "$IMG" "$T"
}

# (a) local restore.
drop_caches
t0=$(now)
$BIN/pilotlight-receiver restore --dir "$WORK/rcv" --server bench --volume v --latest --to "$T" >/dev/null
t1=$(now); LOCAL=$(secs "$t0" "$t1")
cmp "$IMG" "$T"
printf '   (a) local restore: %.2fs\n' "$LOCAL"

# Overwrite 1% of the 64 KiB blocks of $T with random data (seeded: the
# same blocks every time); prints the compressed size of the point's
# version of those blocks (zstd -1 each, capped at the block, as stored).
change_one_percent() {
    python3 - "$T" "$IMG" <<'PY'
import os, random, subprocess, sys
target, img = sys.argv[1], sys.argv[2]
bs = 65536
blocks = os.path.getsize(img) // bs
random.seed(17)
pick = random.sample(range(blocks), blocks // 100)
total = 0
with open(target, "r+b") as t, open(img, "rb") as f:
    for b in pick:
        t.seek(b * bs); t.write(os.urandom(bs))
        f.seek(b * bs); data = f.read(bs)
        if data.count(0) == len(data):
            continue  # a zero block: no payload
        z = subprocess.run(["zstd", "-1", "-c"], input=data, capture_output=True, check=True).stdout
        total += min(len(z), len(data))
print(len(pick), total)
PY
}
read -r NCHANGED ZBYTES < <(change_one_percent)
restore_net "$WORK/delta.json"
DELTA=$(json "$WORK/delta.json" seconds); DWIRE=$(json "$WORK/delta.json" wire_bytes)
DFETCHED=$(json "$WORK/delta.json" blocks_fetched)
printf '   (b) 1%% differs (%s blocks, %s bytes compressed): fetched %s blocks, %s bytes on the wire (%sx), %.2fs\n' \
    "$NCHANGED" "$ZBYTES" "$DFETCHED" "$DWIRE" "$(ratio "$DWIRE" "$ZBYTES")" "$DELTA"

# (c) entirely different target.
python3 - "$T" <<'PY'
import os, sys
with open(sys.argv[1], "r+b") as f:
    size = f.seek(0, 2); f.seek(0)
    while f.tell() < size:
        f.write(os.urandom(min(1 << 20, size - f.tell())))
PY
# The time to read the whole target alone, as the compare reads it.
drop_caches
t0=$(now)
dd if="$T" of=/dev/null bs=4M iflag=direct status=none
t1=$(now); READ=$(secs "$t0" "$t1")
printf '   read the whole target alone: %.2fs\n' "$READ"
restore_net "$WORK/full.json"
FULL=$(json "$WORK/full.json" seconds); FWIRE=$(json "$WORK/full.json" wire_bytes)
FFETCHED=$(json "$WORK/full.json" blocks_fetched)
printf '   (c) all differs: fetched %s blocks, %s bytes on the wire, %.2fs\n' "$FFETCHED" "$FWIRE" "$FULL"

RRSS=$(awk '/VmHWM/ {print $2}' /proc/$RPID/status)
ARSS=$(cat "$WORK/delta.json.rss" "$WORK/full.json.rss" | sort -n | tail -1)

# (d) rsync of the same 1% change.
change_one_percent >/dev/null
drop_caches
t0=$(now)
rsync --inplace --no-whole-file --stats "$IMG" "$T" >"$WORK/rsync.txt"
t1=$(now); RSYNC=$(secs "$t0" "$t1")
RSENT=$(awk '/^Total bytes sent/ {gsub(",", "", $4); print $4}' "$WORK/rsync.txt")
cmp "$IMG" "$T"
printf '   (d) rsync: %s bytes sent, %.2fs\n' "$RSENT" "$RSYNC"

cat <<EOF2

## Fail back by delta (issue 17)

\`benches/failback.sh $G\` ($(date -u +%Y-%m-%d), $(nproc) cores, $PROFILE build): a ${G} GiB mixed image
(half random, a quarter zeros, a quarter text) replicated to a receiver on 127.0.0.1, then
\`pilotlight-agent restore\` over TLS onto a target file; page cache dropped before each timed step.

| case | pilotlight | compared with | ratio | target |
|---|---|---|---|---|
| 1% of the 64 KiB blocks differ ($NCHANGED) | $DWIRE bytes on the wire, $DFETCHED blocks fetched | $ZBYTES bytes: those blocks of the point, zstd -1 | **$(ratio "$DWIRE" "$ZBYTES")x** | ≤ 1.1x |
| 1% differ: time | $(printf %.2f "$DELTA") s | local \`restore\` $(printf %.2f "$LOCAL") s | **$(ratio "$DELTA" "$LOCAL")x** | ≤ 0.3x |
| 1% differ: time | $(printf %.2f "$DELTA") s | network restore of everything $(printf %.2f "$FULL") s | **$(ratio "$DELTA" "$FULL")x** | ≤ 0.3x |
| every block differs | $(printf %.2f "$FULL") s ($FFETCHED blocks, $FWIRE bytes on the wire) | local \`restore\` $(printf %.2f "$LOCAL") s | **$(ratio "$LOCAL" "$FULL")x** of its speed | ≥ 0.8x |
| 1% differ: reading the whole target alone | $(printf %.2f "$READ") s | local \`restore\` $(printf %.2f "$LOCAL") s | $(ratio "$READ" "$LOCAL")x | — |
| rsync of the same 1% | $DWIRE bytes, $(printf %.2f "$DELTA") s | rsync --inplace --no-whole-file: $RSENT bytes sent, $(printf %.2f "$RSYNC") s | $(ratio "$DWIRE" "$RSENT")x the bytes, $(ratio "$DELTA" "$RSYNC")x the time | — |

Peak RSS: agent $((ARSS / 1024)) MiB (the larger of its two restores), receiver $((RRSS / 1024)) MiB (over the whole run, replication included).
EOF2
