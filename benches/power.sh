#!/usr/bin/env bash
# A longer power-loss campaign than CI's (tests/power.rs): IMAGES crash images
# per round (default 5000), ROUNDS rounds (default 1), each round a fresh
# workload and a fresh seed, printed so a failure can be replayed with
# PILOTLIGHT_POWER_SEED. Needs root, nbdkit + nbdkit-plugin-python, nbdfuse
# (libnbd-bin), e2fsprogs. Failing images are kept under $TMPDIR.
#
#   benches/power.sh [IMAGES] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
images=${1:-5000}
rounds=${2:-1}
cargo build --release --tests --locked -q
for round in $(seq 1 "$rounds"); do
    echo "== round $round of $rounds: $images images"
    PILOTLIGHT_POWER_IMAGES=$images cargo test --release --locked -q --test power -- \
        --include-ignored --nocapture 2>&1 | grep -E '^(power loss|FAILED|test result)'
done
