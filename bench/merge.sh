#!/usr/bin/env bash
# Merge benchmark: a full stream and 10 incrementals (10% of the 64 KiB blocks changed per
# point, random blocks, fixed seed) of one disk, merged into a synthetic full, against
# restoring the same chain to a file and against recompressing (restore, then `zstd -1`).
#
#   bench/merge.sh                        # 4 GiB disk
#   MERGE_SIZE=256M bench/merge.sh        # a quick run
#   BIN=target/debug/cbtstream ...        # a given binary instead of a release build
#   MERGE_CHANGES=areas bench/merge.sh    # changes in areas of 64 KiB-1 MiB (as guests write)
#                                         # instead of single 64 KiB blocks (the worst case)
#
# Prints MB/s of output (the merged or recompressed stream; the image for restore), MB/s of
# the disk's virtual size (the same work measured the same way for all three) and CPU
# seconds per GB of output. Target (issue 11): merge at least 2x restore's throughput.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${MERGE_SIZE:-4G}
CHANGES=${MERGE_CHANGES:-blocks}
POINTS=10
DIR=${BENCH_DIR:-/var/tmp/cbtstream-bench}/merge
rm -rf "$DIR" && mkdir -p "$DIR"
for tool in qemu-nbd qemu-img zstd python3; do
    command -v "$tool" >/dev/null || { echo "merge.sh needs $tool"; exit 1; }
done
if [ -z "${BIN:-}" ]; then
    cargo build --release --quiet
    BIN=$PWD/target/release/cbtstream
fi

IMG=$DIR/disk.raw
qemu-img create -q -f raw "$IMG" "$SIZE"
BYTES=$(stat -c %s "$IMG")
# Writes compressible data (zstd -1 gets about 2:1 out of it, like a used disk) into a
# FRACTION of the 64 KiB blocks (random, seeded) and prints their changed-block bitmap.
cat > "$DIR/mutate.py" <<'PY'
import base64, random, sys
path, size, seed, fraction, changes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
block = 65536
blocks = (size + block - 1) // block
rng = random.Random(seed)
if fraction >= 1:
    chosen = range(blocks)
elif changes == "areas":
    # Areas of 1 to 16 blocks (64 KiB to 1 MiB) at random places, until FRACTION is covered.
    picked, want = set(), int(blocks * fraction)
    while len(picked) < want:
        start, n = rng.randrange(blocks), rng.randint(1, 16)
        picked.update(range(start, min(start + n, blocks)))
    chosen = sorted(picked)
else:
    chosen = sorted(rng.sample(range(blocks), int(blocks * fraction)))
bm = bytearray((blocks + 7) // 8)
with open(path, "r+b") as f:
    for b in chosen:
        half = rng.randbytes(block // 2)
        f.seek(b * block)
        f.write((half + bytes(len(half)))[: min(block, size - b * block)])
        bm[b // 8] |= 0x80 >> (b % 8)
sys.stdout.write(base64.b64encode(bm).decode())
PY
python3 "$DIR/mutate.py" "$IMG" "$BYTES" 0 1 "$CHANGES" >/dev/null
SOCK=$DIR/nbd.sock
serve() {
    qemu-nbd -f raw -k "$SOCK" -r -t "$IMG" &
    QPID=$!
    until [ -S "$SOCK" ]; do sleep 0.1; done
}
stop() { kill "$QPID" 2>/dev/null || true; wait "$QPID" 2>/dev/null || true; rm -f "$SOCK"; }
trap 'kill "${QPID:-}" 2>/dev/null || true' EXIT
URI="nbd+unix:///?socket=$SOCK"

serve
"$BIN" export --nbd "$URI" --full --point-id p0 --source-id bench -o "$DIR/p0.cbts"
stop
STREAMS=("$DIR/p0.cbts")
for i in $(seq "$POINTS"); do
    python3 "$DIR/mutate.py" "$IMG" "$BYTES" "$i" 0.1 "$CHANGES" > "$DIR/bm$i.b64"
    serve
    "$BIN" export --nbd "$URI" --changed-blocks "$DIR/bm$i.b64" --base-id "p$((i - 1))" \
        --point-id "p$i" --source-id bench -o "$DIR/p$i.cbts"
    stop
    STREAMS+=("$DIR/p$i.cbts")
done

measure() { # name, output file, command...
    local name=$1 out=$2; shift 2
    rm -f "$out" "$out.cbtstream"
    /usr/bin/time -f "%e %U %S" -o "$DIR/time.txt" "$@" 2>"$DIR/err.txt" >/dev/null \
        || { echo "FAILED: $name"; cat "$DIR/err.txt"; exit 1; }
    read -r wall user sys < "$DIR/time.txt"
    python3 -c 'import sys
name, wall, cpu, size, disk = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]) + float(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
wall = max(wall, 1e-9)
print(f"| {name} | {wall:.2f} | {size / 1e6 / wall:.0f} | {disk / 1e6 / wall:.0f} | {cpu / (size / 1e9):.2f} |")' \
        "$name" "$wall" "$user" "$sys" "$(stat -c %s "$out")" "$BYTES"
}
echo "| case ($SIZE disk, full + $POINTS incrementals, changes: $CHANGES) | wall s | MB/s of output | MB/s of disk | CPU s/GB of output |"
echo "|---|---|---|---|---|"
measure "merge" "$DIR/merged.cbts" "$BIN" merge "${STREAMS[@]}" -o "$DIR/merged.cbts"
measure "restore to a file" "$DIR/restored.raw" "$BIN" restore --to "$DIR/restored.raw" "${STREAMS[@]}"
measure "recompress (restore, then zstd -1)" "$DIR/recompressed.zst" bash -c \
    "'$BIN' restore --to '$DIR/r.raw' ${STREAMS[*]} && zstd -q -1 -f '$DIR/r.raw' -o '$DIR/recompressed.zst'"
cmp "$DIR/restored.raw" "$IMG" && echo "restore of the chain equals the disk"
"$BIN" restore --to "$DIR/from-merged.raw" "$DIR/merged.cbts" 2>/dev/null
cmp "$DIR/from-merged.raw" "$IMG" && echo "restore of the merged stream equals the disk"
