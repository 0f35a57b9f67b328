#!/usr/bin/env bash
# Scale benchmark: peak RSS and wall time of cbtstream on disks far larger than memory.
#
#   bench/scale.sh                        # 16 TiB, 1 round
#   SCALE_SIZE=1T SCALE_ROUNDS=3 bench/scale.sh
#   SCALE_ONLY='^full' bench/scale.sh     # only the cases whose name matches (bash regex)
#   SCALE_LIMIT=120 bench/scale.sh        # stop a case after this many seconds (default 300):
#                                         # its peak RSS is then that of the steady state
#
# Cases, all against one read-only `nbdkit sparse-random` on a Unix socket (no TLS: the
# point is the planner and the pipeline, not the cipher), output to /dev/null:
#   full: cbtstream --full (block status skips the zeroes) against `nbdcopy URI null:`;
#   incremental: CBT bitmaps of the whole disk with 0.1% and 50% of the 64 KiB blocks set
#   (random blocks, fixed seed: the 50% one is as fragmented as a bitmap gets).
# Targets (issue 9): peak RSS under 64 MiB for every cbtstream case; the full export no
# slower than nbdcopy. The 50% incremental reads half the disk (8 TiB at 16T): expect it to
# take a long time; use SCALE_ONLY to leave it out.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${SCALE_SIZE:-16T}
ROUNDS=${SCALE_ROUNDS:-1}
DIR=${BENCH_DIR:-/var/tmp/cbtstream-bench}/scale
mkdir -p "$DIR"

need=()
command -v nbdkit >/dev/null || need+=(nbdkit)
command -v nbdcopy >/dev/null || need+=(libnbd-bin)
[ -x /usr/bin/time ] || need+=(time)
if ((${#need[@]})); then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
cargo build --release --quiet
BIN=$PWD/target/release/cbtstream

SOCK=$DIR/nbdkit.sock
rm -f "$SOCK"
nbdkit -r -f -U "$SOCK" sparse-random "$SIZE" percent=0.0025 seed=1 &
PIDS=($!)
trap 'kill "${PIDS[@]}" 2>/dev/null || true' EXIT
# sparse-random lays out its data at start: give it time, as long as it runs.
until [ -S "$SOCK" ]; do
    kill -0 "${PIDS[0]}" 2>/dev/null || { echo "nbdkit sparse-random $SIZE did not start"; exit 1; }
    sleep 0.2
done
URI="nbd+unix:///?socket=$SOCK"
BYTES=$(nbdinfo --size "$URI")

# The bitmaps: one bit per 64 KiB block, most significant bit first, base64.
python3 - "$BYTES" "$DIR" <<'PY'
import base64, os, random, sys
size, d = int(sys.argv[1]), sys.argv[2]
blocks = (size + 65535) // 65536
nbytes = (blocks + 7) // 8
for name, fraction in (("bm-0.1.b64", 0.001), ("bm-50.b64", 0.5)):
    path = f"{d}/{name}"
    if os.path.exists(path) and os.path.getsize(path) > 0:
        continue
    rng = random.Random(42)
    if fraction == 0.5:
        bm = bytearray(rng.randbytes(nbytes))
    else:
        bm = bytearray(nbytes)
        for b in rng.sample(range(blocks), int(blocks * fraction)):
            bm[b // 8] |= 0x80 >> (b % 8)
    # Bits past the end of the disk must be clear.
    for b in range(blocks, nbytes * 8):
        bm[b // 8] &= ~(0x80 >> (b % 8)) & 0xff
    with open(path + ".tmp", "wb") as f:
        f.write(base64.b64encode(bm))
    os.rename(path + ".tmp", path)
PY

CB=("$BIN" export --nbd "'$URI'" --compress none -o /dev/null --json)
# name @ command (run with bash -c); no "@" in any field
CASES=(
    "full $SIZE: cbtstream --full@${CB[*]} --full"
    "full $SIZE: nbdcopy URI null:@nbdcopy '$URI' null:"
    "incremental $SIZE, 0.1% of the blocks: cbtstream@${CB[*]} --changed-blocks $DIR/bm-0.1.b64"
    "incremental $SIZE, 50% of the blocks: cbtstream@${CB[*]} --changed-blocks $DIR/bm-50.b64"
)

RAW=$DIR/raw.txt
: > "$RAW"
for round in $(seq "$ROUNDS"); do
    for c in "${CASES[@]}"; do
        IFS='@' read -r name cmd <<<"$c"
        [[ -z "${SCALE_ONLY:-}" || "$name" =~ $SCALE_ONLY ]] || continue
        status=0
        /usr/bin/time -f "%e %M" -o "$DIR/time.txt" timeout "${SCALE_LIMIT:-300}" bash -c "$cmd" \
            >/dev/null 2>"$DIR/err.txt" || status=$?
        if [ "$status" -eq 124 ]; then
            name="$name (stopped after ${SCALE_LIMIT:-300} s)"
        elif [ "$status" -ne 0 ]; then
            echo "FAILED: $name"; cat "$DIR/err.txt"; exit 1
        fi
        read -r wall rss < <(tail -1 "$DIR/time.txt")
        json=$(grep -m1 '^{' "$DIR/err.txt" || echo '{}')
        printf '%s@%s@%s@%s@%s\n' "$round" "$name" "$wall" "$rss" "$json" >> "$RAW"
        echo "round $round: $name: ${wall}s, ${rss} KiB" >&2
    done
done

python3 - "$RAW" <<'PY'
import json, statistics, sys
rows, order = {}, []
for line in open(sys.argv[1]):
    _, name, wall, rss, js = line.rstrip("\n").split("@", 4)
    if name not in rows:
        order.append(name); rows[name] = []
    rows[name].append((float(wall), int(rss) / 1024, json.loads(js)))
print("| case | wall s median (min-max) | peak RSS MiB (max) | bytes read |")
print("|---|---|---|---|")
for name in order:
    r = rows[name]
    walls = [x[0] for x in r]
    read = r[-1][2].get("bytes_read", "-")
    print(f"| {name} | {statistics.median(walls):.2f} ({min(walls):.2f}-{max(walls):.2f}) | {max(x[1] for x in r):.0f} | {read} |")
PY
echo
echo "$(date -u +%F), $(nproc) cores, $(uname -r), nbdkit $(nbdkit --version | awk '{print $2}'), nbdcopy $(nbdcopy --version | head -1 | awk '{print $2}'), size $SIZE, $ROUNDS rounds"
