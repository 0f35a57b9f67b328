#!/usr/bin/env bash
# Benchmark: cbtstream against the reference NBD clients, side by side, on loopback TLS.
#
#   bench/bench.sh            # 4 GiB image, 3 rounds
#   BENCH_SIZE_MIB=1024 BENCH_ROUNDS=5 bench/bench.sh
#   BENCH_ONLY='^full' bench/bench.sh      # only the cases whose name matches (bash regex)
#
# Installs its peers (nbdcopy and libnbd from Debian packages, zstd), builds cbtstream in
# release mode and a native libnbd client (bench/sparse_read.c), makes a test image (half
# random, half text; kept in $BENCH_DIR between runs), starts qemu-nbd with TLS, and runs every
# case once per round, in turn (A B C ... A B C ...), so drift on this shared machine hits
# all cases alike. Reports the median and range of MB/s (10^6 B/s), client CPU seconds per GB
# (user + sys of the client process), and peak RSS. Raw runs go to $BENCH_DIR/raw.txt.
#
# Also: @vates/nbd-client (Xen Orchestra's client; npm install into $BENCH_DIR/vates from
# bench/package.json, SKIPped if node/npm or the install are missing), the XenServer-profile
# server (target/release/xen-nbd-server: TLS 1.2, EXPORT_NAME only, simple replies), and
# the sparse case through a delay-line proxy (latency-proxy: 5 ms each way, 10 ms round trip;
# and 0 ms, the baseline for the round-trip target).
# Disks far larger than memory (16 TiB: peak RSS and wall time): bench/scale.sh.
# After the table, the cbtstream-proto micro benchmarks (xmlrpc_parse, cbt_plan), unless
# BENCH_MICRO=0 (they build once, then take a few seconds).
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
cargo build --release --quiet -p cbtstream-testkit --bin xen-nbd-server --bin latency-proxy
BIN=$ROOT/target/release/cbtstream
XEN_BIN=$ROOT/target/release/xen-nbd-server
PROXY_BIN=$ROOT/target/release/latency-proxy
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
PIDS=($QPID)
trap 'kill "${PIDS[@]}" 2>/dev/null || true' EXIT
for _ in $(seq 100); do nbdinfo --size "nbds://127.0.0.1:$PORT/disk?tls-certificates=$DIR/pki" >/dev/null 2>&1 && break; sleep 0.1; done

URI="nbds://127.0.0.1:$PORT/disk"
LURI="$URI?tls-certificates=$DIR/pki"
CB=("$BIN" export --nbd "$URI" --tls-ca "$DIR/pki/ca-cert.pem")
SIZE=$(stat -c %s "$IMG")
SPARSE=$((SIZE / 4 / 65536 * 65536))
SKIPS=$DIR/skips.txt
: > "$SKIPS"
skip() { echo "SKIP: $1: $2" >&2; printf '%s@%s\n' "$1" "$2" >> "$SKIPS"; }

# @vates/nbd-client: npm install into $DIR/vates (again only when bench/package.json changed).
VATES_NAME="sparse 25%: vates/nbd-client (XO, npm) readBlock 64 KiB, nbdConcurrency 4, readAhead 16 (server not verified)"
VATES=()
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    skip "$VATES_NAME" "node or npm not found"
else
    mkdir -p "$DIR/vates"
    if ! cmp -s bench/package.json "$DIR/vates/package.json" || [ ! -f "$DIR/vates/node_modules/@vates/nbd-client/multi.mjs" ]; then
        cp bench/package.json "$DIR/vates/package.json"
        rm -f "$DIR/vates/package-lock.json"
        (cd "$DIR/vates" && timeout 300 npm install --no-audit --no-fund --loglevel=error) >"$DIR/npm.log" 2>&1 || true
    fi
    if [ -f "$DIR/vates/node_modules/@vates/nbd-client/multi.mjs" ]; then
        cp bench/vates_sparse.mjs "$DIR/vates/"
        VATES=("$VATES_NAME@$SPARSE@node $DIR/vates/vates_sparse.mjs 127.0.0.1 $PORT disk $DIR/blocks.txt 4 16 $DIR/pki/server-cert.pem")
    else
        skip "$VATES_NAME" "npm install of @vates/nbd-client failed (see $DIR/npm.log: $(grep -m1 -i 'err' "$DIR/npm.log" || true))"
        rm -f "$DIR/vates/package.json"
    fi
fi

# XenServer-profile server (self-signed XAPI-style certificate, XAPI-style export name).
XEN_EXPORT="/3f1c7a4e-1d2b-4c3d-9e8f-001122334455?session_id=OpaqueRef:5ecret-5e55ion"
"$XEN_BIN" --image "$IMG" --cert-dir "$DIR/xen-pki" --export "$XEN_EXPORT" > "$DIR/xen.json" 2>"$DIR/xen.err" &
PIDS+=($!)
for _ in $(seq 100); do [ -s "$DIR/xen.json" ] && break; sleep 0.1; done
read -r XEN_PORT XEN_CERT XEN_LIBNBD < <(python3 -c 'import json,sys; j=json.loads(open(sys.argv[1]).readline()); print(j["port"], j["cert"], j["libnbd_dir"])' "$DIR/xen.json") \
    || { echo "xen-nbd-server did not start:"; cat "$DIR/xen.err"; exit 1; }
XEN_URI="nbds://127.0.0.1:$XEN_PORT/${XEN_EXPORT//\?/%3F}"
# Xen Orchestra's client against the server it is made for.
VATES_XEN=()
if ((${#VATES[@]})); then
    VATES_XEN=("xen-nbd-server ${VATES_NAME}@$SPARSE@node $DIR/vates/vates_sparse.mjs 127.0.0.1 $XEN_PORT '$XEN_EXPORT' $DIR/blocks.txt 4 16 $XEN_CERT")
fi

# Latency: the qemu-nbd server behind a delay-line proxy (tests/testkit/src/bin/latency-proxy.rs)
# that holds each direction 5 ms (10 ms round trip), and the same proxy with no delay: the
# pair isolates the round trip from the proxy's own cost on these 2 cores.
start_proxy() {
    rm -f "$DIR/proxy$1.port"
    "$PROXY_BIN" "$PORT" "$1" --parent $$ > "$DIR/proxy$1.port" &
    PIDS+=($!)
    for _ in $(seq 100); do [ -s "$DIR/proxy$1.port" ] && break; sleep 0.1; done
}
start_proxy 5
start_proxy 0
LAT_URI="nbds://127.0.0.1:$(head -1 "$DIR/proxy5.port")/disk"
NODELAY_URI="nbds://127.0.0.1:$(head -1 "$DIR/proxy0.port")/disk"

# name | bytes counted for MB/s | command (run with bash -c); no "@" in any field
CASES=(
    "sparse 25%: cbtstream --compress none -o /dev/null@$SPARSE@${CB[*]} --changed-blocks $DIR/blocks.b64 --compress none -o /dev/null"
    "sparse 25%: libnbd C client, 1 conn x 64 in flight@$SPARSE@$DIR/sparse_read '$LURI' $DIR/blocks.txt 1 64"
    "full: cbtstream --full --compress none -o /dev/null@$SIZE@${CB[*]} --full --compress none -o /dev/null"
    "full: nbdcopy URI null:@$SIZE@nbdcopy '$LURI' null:"
    "full+zstd: cbtstream --full (zstd -1) -o FILE@$SIZE@${CB[*]} --full -o $DIR/out.cbts"
    "full+zstd: nbdcopy URI - | zstd -1 -T2 > FILE@$SIZE@nbdcopy '$LURI' - | zstd -q -1 -T2 > $DIR/out.zst"
    "restore: cbtstream restore (of the line above's stream)@$SIZE@rm -f $DIR/restored.raw*; $BIN restore --to $DIR/restored.raw $DIR/out.cbts"
    "restore: zstd -d (of nbdcopy's .zst)@$SIZE@zstd -q -d -f $DIR/out.zst -o $DIR/restored.zst.raw"
    "${VATES[@]}"
    "xen-nbd-server sparse 25%: cbtstream --compress none -o /dev/null@$SPARSE@$BIN export --nbd '$XEN_URI' --tls-cert $XEN_CERT --tls-server-name localhost --changed-blocks $DIR/blocks.b64 --compress none -o /dev/null"
    "xen-nbd-server sparse 25%: libnbd C client, 1 conn x 64 in flight@$SPARSE@$DIR/sparse_read '$XEN_URI?tls-certificates=$XEN_LIBNBD' $DIR/blocks.txt 1 64"
    "${VATES_XEN[@]}"
    "proxy 0 ms sparse 25%: cbtstream --compress none -o /dev/null@$SPARSE@$BIN export --nbd $NODELAY_URI --tls-ca $DIR/pki/ca-cert.pem --tls-server-name localhost --changed-blocks $DIR/blocks.b64 --compress none -o /dev/null"
    "proxy 10 ms RTT sparse 25%: cbtstream --compress none -o /dev/null@$SPARSE@$BIN export --nbd $LAT_URI --tls-ca $DIR/pki/ca-cert.pem --tls-server-name localhost --changed-blocks $DIR/blocks.b64 --compress none -o /dev/null"
    "proxy 0 ms sparse 25%: libnbd C client, 1 conn x 64 in flight@$SPARSE@$DIR/sparse_read '$NODELAY_URI?tls-certificates=$DIR/pki' $DIR/blocks.txt 1 64"
    "proxy 10 ms RTT sparse 25%: libnbd C client, 1 conn x 64 in flight@$SPARSE@$DIR/sparse_read '$LAT_URI?tls-certificates=$DIR/pki' $DIR/blocks.txt 1 64"
)

RAW=$DIR/raw.txt
: > "$RAW"
for round in $(seq "$ROUNDS"); do
    for c in "${CASES[@]}"; do
        IFS='@' read -r name bytes cmd <<<"$c"
        [[ -z "${BENCH_ONLY:-}" || "$name" =~ $BENCH_ONLY ]] || continue
        sync
        /usr/bin/time -f "%e %U %S %M" -o "$DIR/time.txt" bash -c "$cmd" >/dev/null 2>"$DIR/err.txt" \
            || { echo "FAILED: $name"; cat "$DIR/err.txt"; exit 1; }
        read -r wall user sys rss < <(tail -1 "$DIR/time.txt")
        printf '%s@%s@%s@%s@%s@%s@%s\n' "$round" "$name" "$bytes" "$wall" "$user" "$sys" "$rss" >> "$RAW"
        echo "round $round: $name: ${wall}s" >&2
    done
done
ls -l "$DIR/out.cbts" "$DIR/out.zst" | awk '{print "output size: " $9 " " $5}' >&2

python3 - "$RAW" "$SKIPS" <<'PY'
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
for line in open(sys.argv[2]):
    name, why = line.rstrip("\n").split("@", 1)
    print(f"| {name} | SKIP: {why} | - | - |")
PY
echo
echo "$(date -u +%F), $(nproc) cores, $(uname -r), qemu-nbd $(qemu-nbd --version | head -1 | awk '{print $2}'), nbdcopy $(nbdcopy --version | head -1 | awk '{print $2}'), zstd $(zstd -V | grep -o 'v[0-9.]*'), image $SIZE_MIB MiB, $ROUNDS rounds"

# Micro benchmarks of the proto crate (built once in the bench profile; a few seconds each).
if [ "${BENCH_MICRO:-1}" = 1 ]; then
    echo
    { cargo bench --quiet -p cbtstream-proto --bench xmlrpc_parse && cargo bench --quiet -p cbtstream-proto --bench cbt_plan; } \
        > "$DIR/micro.txt" 2>"$DIR/micro.err" || { echo "micro benchmarks FAILED:"; tail -5 "$DIR/micro.err"; }
    # One line each: the median parse of the list_changed_blocks response, and the 16 TiB plan times.
    python3 - "$DIR/micro.txt" <<'PY'
import re, sys
lines = open(sys.argv[1]).read().splitlines()
head = next((l for l in lines if l.startswith("list_changed_blocks response")), "")
xml = re.search(r"(\d+) bytes of XML", head)
parse = next((l for l in lines if l.startswith("decode_xenapi (parse")), None)
if parse:
    ms = re.search(r"([\d.]+) ms\s+\(\s*(\d+) MB/s\)", parse)
    size = f"{int(xml.group(1)) / 1e6:.1f} MB" if xml else "?"
    print(f"xmlrpc_parse: list_changed_blocks response ({size} XML, 3 TiB disk): median parse {ms.group(1)} ms ({ms.group(2)} MB/s)")
plan = [re.match(r"16 TiB bitmap, (.*): decode \+ plan (\S+) \(median of 5\), (\d+) extents", l) for l in lines]
plan = [m for m in plan if m]
if plan:
    print("cbt_plan: 16 TiB bitmap decode + plan, median of 5: " + ", ".join(f"{m.group(1)} {m.group(2)} ({m.group(3)} extents)" for m in plan))
PY
fi
