#!/usr/bin/env bash
# The demo: a generated disk served over TLS by qemu-nbd (on a Unix socket), exported in full,
# changed, exported incrementally straight into `cbtstream restore` through a pipe, and
# checked byte for byte against the disk at each point.
#
#   scripts/install-deps.sh && scripts/demo-nbd.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MIB=${DEMO_SIZE_MIB:-512}
cargo build --release --quiet
BIN=$PWD/target/release/cbtstream
work=$(mktemp -d)
cleanup() {
    [ -f "$work/qemu.pid" ] && kill "$(cat "$work/qemu.pid")" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
cd "$work"

echo "== certificates (a CA and a server certificate for localhost)"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca-key.pem -out ca-cert.pem \
    -days 2 -subj /CN=demo-ca -addext basicConstraints=critical,CA:TRUE 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout server-key.pem -out server.csr \
    -subj /CN=localhost 2>/dev/null
openssl x509 -req -in server.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial -out server-cert.pem -days 2 \
    -extfile <(printf "subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth") 2>/dev/null

echo "== a ${SIZE_MIB} MiB disk: a quarter random, a quarter zero, half text"
q=$((SIZE_MIB / 4))
head -c $((q << 20)) /dev/urandom > disk.raw
truncate -s $((2 * q << 20)) disk.raw
python3 - "$((2 * q << 20))" <<'PY2' >> disk.raw
import glob, os, sys
n = int(sys.argv[1]); text = bytearray()
for p in glob.glob("/usr/share/common-licenses/*") + glob.glob("/usr/share/doc/*/copyright"):
    try:
        text += open(p, "rb").read()
    except OSError:
        pass
    if len(text) > 8 << 20:
        break
text = bytes(text) or b"lorem ipsum dolor sit amet "
sys.stdout.buffer.write((text * (n // len(text) + 1))[:n])
PY2

echo "== qemu-nbd, TLS, read-only, on a Unix socket"
qemu-nbd --fork --pid-file "$work/qemu.pid" -r -t -f raw --shared=0 -x disk -k "$work/nbd.sock" \
    --object tls-creds-x509,id=tls0,dir="$work",endpoint=server,verify-peer=off --tls-creds tls0 disk.raw
URI="nbds+unix:///disk?socket=$work/nbd.sock"
TLS=(--tls-ca ca-cert.pem --tls-server-name localhost)

echo "== full export"
"$BIN" export --nbd "$URI" "${TLS[@]}" --full --point-id p0 -o full.cbts --json
ls -l full.cbts | awk '{print "   stream:", $5, "bytes"}'
"$BIN" inspect full.cbts | sed 's/^/   /'
"$BIN" restore --to restored.raw full.cbts
cmp restored.raw disk.raw && echo "   restored image == disk"

echo "== the guest writes: 200 random writes, some across 64 KiB boundaries"
python3 - "$((SIZE_MIB << 20))" <<'PY'
import base64, os, random, sys
size = int(sys.argv[1]); r = random.Random(42)
blocks = (size + 65535) // 65536
bm = bytearray((blocks + 7) // 8)
with open("disk.raw", "r+b") as f:
    for _ in range(200):
        n = r.randrange(512, 300_000); off = r.randrange(0, size - n)
        f.seek(off); f.write(os.urandom(n))
        for b in range(off // 65536, (off + n - 1) // 65536 + 1):
            bm[b // 8] |= 0x80 >> (b % 8)
open("changed.b64", "w").write(base64.b64encode(bm).decode())
print(f"   {sum(bin(x).count('1') for x in bm)} of {blocks} blocks changed")
PY

echo "== incremental export, piped into restore"
"$BIN" export --nbd "$URI" "${TLS[@]}" --changed-blocks changed.b64 --base-id p0 --point-id p1 -o - --json \
    | "$BIN" restore --to restored.raw -
cmp restored.raw disk.raw && echo "   restored image == disk after the incremental"
echo "== demo OK"
