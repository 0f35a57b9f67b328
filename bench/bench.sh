#!/usr/bin/env bash
# Benchmark: cbtstream against the reference NBD clients, side by side, on loopback TLS.
#
#   bench/bench.sh            # 4 GiB image, 3 rounds
#   BENCH_SIZE_MIB=1024 BENCH_ROUNDS=5 bench/bench.sh
#
# Installs its peers (nbdcopy and libnbd from Debian packages, zstd), builds cbtstream in
# release mode and a native libnbd client (bench/sparse_read.c), makes a test image (half
# random, half text; kept in $BENCH_DIR between runs), starts qemu-nbd with TLS, and runs every
# case once per round, in turn (A B C ... A B C ...), so drift on this shared machine hits
# all cases alike. Reports the median and range of MB/s (10^6 B/s), client CPU seconds per GB
# (user + sys of the client process), and peak RSS. Raw runs go to $BENCH_DIR/raw.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SIZE_MIB=${BENCH_SIZE_MIB:-4096}
ROUNDS=${BENCH_ROUNDS:-3}
DIR=${BENCH_DIR:-/var/tmp/cbtstream-bench}
mkdir -p "$DIR"

need=()
command -v nbdcopy >/dev/null || need+=(libnbd-bin)
[ -e /usr/include/libnbd.h ] || need+=(libnbd-dev)
command -v zstd >/dev/null || need+=(zstd)
command -v qemu-nbd >/dev/null || need+=(qemu-utils)
command -v gcc >/dev/null || need+=(gcc)
[ -x /usr/bin/time ] || need+=(time)
if ((${#need[@]})); then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

cargo build --release --quiet
BIN=$ROOT/target/release/cbtstream
gcc -O2 -o "$DIR/sparse_read" bench/sparse_read.c -lnbd -lpthread

IMG=$DIR/disk-$SIZE_MIB.raw
if [ ! -f "$IMG" ]; then
    echo "making $IMG" >&2
    python3 - "$IMG" "$SIZE_MIB" <<'PY'
import glob, gzip, os, random, sys
path, mib = sys.argv[1], int(sys.argv[2])
buf = bytearray()
for p in glob.glob('/usr/share/doc/**/*', recursive=True) + glob.glob('/usr/share/man/man*/*.gz'):
    try:
        if os.path.isfile(p):
            d = open(p, 'rb').read()
            buf += gzip.decompress(d) if p.endswith('.gz') else d
    except Exception:
        pass
    if len(buf) > 48 << 20:
        break
corpus = bytes(buf) or b"lorem ipsum " * 100000
rng = random.Random(42)
with open(path + '.tmp', 'wb') as f:
    for _ in range(mib // 2):
        f.write(os.urandom(1 << 20))
    for _ in range(mib - mib // 2):
        chunk = bytearray()
        while len(chunk) < 1 << 20:
            off = rng.randrange(0, max(1, len(corpus) - 65536))
            chunk += corpus[off:off + 65536]
        f.write(chunk[:1 << 20])
os.rename(path + '.tmp', path)
PY
fi
# Warm the page cache so the server does not touch the disk.
cat "$IMG" > /dev/null

# A random 25% of the 64 KiB blocks (fixed seed), as a block list and as a CBT bitmap.
python3 - "$IMG" "$DIR" <<'PY'
import base64, os, random, sys
img, d = sys.argv[1], sys.argv[2]
blocks = os.path.getsize(img) // 65536
chosen = sorted(random.Random(12345).sample(range(blocks), blocks // 4))
open(f"{d}/blocks.txt", "w").write("\n".join(map(str, chosen)) + "\n")
bm = bytearray((blocks + 7) // 8)
for b in chosen:
    bm[b // 8] |= 0x80 >> (b % 8)
open(f"{d}/blocks.b64", "w").write(base64.b64encode(bm).decode())
PY

# Certificates and the server.
if [ ! -f "$DIR/pki/server-cert.pem" ]; then
    mkdir -p "$DIR/pki"
    (cd "$DIR/pki"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca-key.pem -out ca-cert.pem \
        -days 3650 -subj /CN=bench-ca -addext basicConstraints=critical,CA:TRUE 2>/dev/null
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout server-key.pem -out s.csr -subj /CN=localhost 2>/dev/null
    openssl x509 -req -in s.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial -out server-cert.pem -days 3650 \
        -extfile <(printf "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth") 2>/dev/null)
fi
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
qemu-nbd -r -t -f raw --shared=0 -x disk -b 127.0.0.1 -p "$PORT" \
    --object tls-creds-x509,id=tls0,dir="$DIR/pki",endpoint=server,verify-peer=off --tls-creds tls0 "$IMG" &
QPID=$!
trap 'kill $QPID 2>/dev/null || true' EXIT
for _ in $(seq 100); do nbdinfo --size "nbds://127.0.0.1:$PORT/disk?tls-certificates=$DIR/pki" >/dev/null 2>&1 && break; sleep 0.1; done

URI="nbds://127.0.0.1:$PORT/disk"
LURI="$URI?tls-certificates=$DIR/pki"
CB=("$BIN" export --nbd "$URI" --tls-ca "$DIR/pki/ca-cert.pem")
SIZE=$(stat -c %s "$IMG")
SPARSE=$((SIZE / 4 / 65536 * 65536))

# name | bytes counted for MB/s | command (run with bash -c)
CASES=(
    "sparse 25%: cbtstream --compress none -o /dev/null@$SPARSE@${CB[*]} --changed-blocks $DIR/blocks.b64 --compress none -o /dev/null"
    "sparse 25%: libnbd C client, 1 conn x 64 in flight@$SPARSE@$DIR/sparse_read '$LURI' $DIR/blocks.txt 1 64"
    "full: cbtstream --full --compress none -o /dev/null@$SIZE@${CB[*]} --full --compress none -o /dev/null"
    "full: nbdcopy URI null:@$SIZE@nbdcopy '$LURI' null:"
    "full+zstd: cbtstream --full (zstd -1) -o FILE@$SIZE@${CB[*]} --full -o $DIR/out.cbts"
    "full+zstd: nbdcopy URI - | zstd -1 -T2 > FILE@$SIZE@nbdcopy '$LURI' - | zstd -q -1 -T2 > $DIR/out.zst"
    "restore: cbtstream restore (of the line above's stream)@$SIZE@rm -f $DIR/restored.raw*; $BIN restore --to $DIR/restored.raw $DIR/out.cbts"
    "restore: zstd -d (of nbdcopy's .zst)@$SIZE@zstd -q -d -f $DIR/out.zst -o $DIR/restored.zst.raw"
)

RAW=$DIR/raw.txt
: > "$RAW"
for round in $(seq "$ROUNDS"); do
    for c in "${CASES[@]}"; do
        IFS='@' read -r name bytes cmd <<<"$c"
        sync
        /usr/bin/time -f "%e %U %S %M" -o "$DIR/time.txt" bash -c "$cmd" >/dev/null 2>"$DIR/err.txt" \
            || { echo "FAILED: $name"; cat "$DIR/err.txt"; exit 1; }
        read -r wall user sys rss < <(tail -1 "$DIR/time.txt")
        printf '%s@%s@%s@%s@%s@%s@%s\n' "$round" "$name" "$bytes" "$wall" "$user" "$sys" "$rss" >> "$RAW"
        echo "round $round: $name: ${wall}s" >&2
    done
done
ls -l "$DIR/out.cbts" "$DIR/out.zst" | awk '{print "output size: " $9 " " $5}' >&2

python3 - "$RAW" <<'PY'
import statistics, sys
rows = {}
order = []
for line in open(sys.argv[1]):
    rnd, name, nbytes, wall, user, sys_, rss = line.rstrip("\n").split("@")
    if name not in rows:
        order.append(name); rows[name] = []
    b = int(nbytes); w = float(wall)
    rows[name].append((b / w / 1e6, (float(user) + float(sys_)) / (b / 1e9), int(rss) / 1024))
print("| case | MB/s median (min-max) | client CPU s/GB | peak RSS MiB |")
print("|---|---|---|---|")
for name in order:
    r = rows[name]
    mbs = [x[0] for x in r]; cpu = [x[1] for x in r]; rss = [x[2] for x in r]
    label = name.replace("|", "\\|")
    print(f"| {label} | {statistics.median(mbs):.0f} ({min(mbs):.0f}-{max(mbs):.0f}) | {statistics.median(cpu):.2f} | {max(rss):.0f} |")
PY
echo
echo "$(date -u +%F), $(nproc) cores, $(uname -r), qemu-nbd $(qemu-nbd --version | head -1 | awk '{print $2}'), nbdcopy $(nbdcopy --version | head -1 | awk '{print $2}'), zstd $(zstd -V | grep -o 'v[0-9.]*'), image $SIZE_MIB MiB, $ROUNDS rounds"
