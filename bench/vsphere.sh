#!/usr/bin/env bash
# vSphere incremental: a 4 GiB disk on the vSphere simulator, 10% of it rewritten in scattered
# areas of 64 KiB to 1 MiB (random data), then read three ways (release build, output to
# /dev/null, no compression):
#   1. cbtstream export --vsphere: snapshot, QueryChangedDiskAreas, HTTP range reads of the
#      frozen flat extent on the datastore file service (TLS, kept-alive connections);
#   2. cbtstream export --nbd of the same bytes and the same changed blocks, served by
#      qemu-nbd over TLS (the XenServer data path);
#   3. the naive baseline: curl, one ranged GET per changed area, in sequence.
# Target (issue 12): 1. at least 0.8x the throughput of 2 (the simulator's task delays, about
# 0.1 s of snapshot and removal, are in 1's wall time; its data plane row leaves them out).
#
#   bench/vsphere.sh          # VS_SIZE_GIB=4 VS_PERCENT=10
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_GIB=${VS_SIZE_GIB:-4}
PERCENT=${VS_PERCENT:-10}
cargo build --release --quiet -p cbtstream -p cbtstream-vsphere-sim
BIN=$PWD/target/release/cbtstream
VSIM=$PWD/target/release/vsphere-sim
for tool in qemu-nbd openssl curl python3; do
    command -v "$tool" >/dev/null || { echo "vsphere.sh needs $tool"; exit 1; }
done
work=$(mktemp -d /var/tmp/cbtstream-vsphere-bench.XXXXXX)
cleanup() {
    [ -n "${VSIM_PID:-}" ] && kill "$VSIM_PID" 2>/dev/null || true
    [ -n "${QPID:-}" ] && kill "$QPID" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
cd "$work"
"$VSIM" --listen 127.0.0.1:0 --data-dir ds --disks 1 --disk-size $((SIZE_GIB << 30)) > vsim.json 2> vsim.log &
VSIM_PID=$!
for _ in $(seq 200); do [ -s vsim.json ] && break; sleep 0.05; done
read -r URL CA USER VM < <(python3 -c 'import json; j=json.load(open("vsim.json")); print(j["url"], j["ca"], j["user"], j["vm"])')
VSPHERE_PASSWORD=$(python3 -c 'import json; print(json.load(open("vsim.json"))["password"])')
export VSPHERE_PASSWORD
EXPORT=("$BIN" export --vsphere "$URL" --vsphere-ca "$CA" --user "$USER" --vm "$VM" --disk 2000 --state vs.json --compress none)

# The simulator's control calls, for the guest writes and the curl baseline.
cat > vs.py <<'PY'
import base64, json, os, random, ssl, sys, time, urllib.request
url, ca, user, vm = sys.argv[1:5]
ctx = ssl.create_default_context(cafile=ca); ctx.check_hostname = False
sdk = url.rstrip("/") + "/sdk/vim25/8.0.2.0"
def call(path, body=None, token=None, method="POST"):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(path if path.startswith("http") else sdk + path, data, {"Content-Type": "application/json"}, method=method)
    if token:
        req.add_header("vmware-api-session-id", token)
    r = urllib.request.urlopen(req, context=ctx)
    return r, (json.loads(r.read() or b"null"))
r, _ = call("/SessionManager/SessionManager/Login", {"userName": user, "password": os.environ["VSPHERE_PASSWORD"]})
token = r.headers["vmware-api-session-id"]
def wait(task):
    while True:
        _, info = call(f"/Task/{task['value']}/info", token=token, method="GET")
        if info["state"] in ("success", "error"):
            return info
        time.sleep(0.05)
cmd = sys.argv[5]
if cmd == "write":  # SIZE PERCENT: scattered areas of 64 KiB to 1 MiB; bitmap and areas out
    size, percent = int(sys.argv[6]), int(sys.argv[7])
    rng, block = random.Random(7), 65536
    blocks, picked = size // block, set()
    while len(picked) < blocks * percent // 100:
        start, n = rng.randrange(blocks), rng.randint(1, 16)
        picked.update(range(start, min(start + n, blocks)))
    runs, b = [], sorted(picked)
    for x in b:
        if runs and runs[-1][1] == x:
            runs[-1][1] = x + 1
        else:
            runs.append([x, x + 1])
    for s, e in runs:
        call(url.rstrip("/") + "/sim/write", {"vm": vm, "disk": 2000, "offset": s * block, "data": base64.b64encode(os.urandom((e - s) * block)).decode()}, token)
    bm = bytearray((blocks + 7) // 8)
    for x in b:
        bm[x // 8] |= 0x80 >> (x % 8)
    open("changed.b64", "w").write(base64.b64encode(bm).decode())
    open("areas.txt", "w").write("".join(f"{s * block} {e * block - 1}\n" for s, e in runs))
    print(f"wrote {len(b) * block} bytes in {len(runs)} areas")
elif cmd == "snapshot":  # prints: snapshot moid, cookie, file URL
    _, t = call(f"/VirtualMachine/{vm}/CreateSnapshotEx_Task", {"name": "bench", "memory": False}, token)
    snap = wait(t)["result"]["value"]
    print(snap, token, url.rstrip("/") + "/folder/testvm/testvm-flat.vmdk?dcPath=dc1&dsName=ds1")
elif cmd == "remove":
    _, t = call(f"/VirtualMachineSnapshot/{sys.argv[6]}/RemoveSnapshot_Task", {"removeChildren": False, "consolidate": True}, token)
    wait(t)
PY
VS=(python3 vs.py "$URL" "$CA" "$USER" "$VM")

"${EXPORT[@]}" --full -o /dev/null >/dev/null 2>&1
"${VS[@]}" write $((SIZE_GIB << 30)) "$PERCENT"
CHANGED=$(python3 -c 'import base64; print(sum(bin(b).count("1") for b in base64.b64decode(open("changed.b64").read())) * 65536)')

row() { # name wall
    python3 -c 'import sys; n, w, b = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]); print(f"| {n} | {w:.2f} | {b / w / 1e6:.0f} |")' "$1" "$2" "$CHANGED"
}
now() { date +%s.%N; }
echo "| incremental of a ${SIZE_GIB} GiB disk, ${PERCENT}% changed in 64 KiB-1 MiB areas ($CHANGED bytes) | wall s | MB/s of changed data |"
echo "|---|---|---|"
t0=$(now); "${EXPORT[@]}" --json -o /dev/null >/dev/null 2> export.log; t1=$(now)
row "cbtstream export --vsphere (datastore file service, 4 TLS connections; snapshot and CBT calls included)" "$(echo "$t1 - $t0" | bc)"
# The same run's data plane alone (its --json data_seconds): what the NBD row is compared with.
row "  of which the data plane (reads, stream; no vCenter calls)" \
    "$(python3 -c 'import json,sys; print([json.loads(l) for l in open("export.log") if l.startswith("{")][-1]["data_seconds"])')"

# The same bytes over NBD with TLS: the disk as the snapshot froze it (no write since).
mkdir pki
(cd pki
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca-key.pem -out ca-cert.pem \
    -days 30 -subj /CN=bench-ca -addext basicConstraints=critical,CA:TRUE 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout server-key.pem -out s.csr -subj /CN=localhost 2>/dev/null
openssl x509 -req -in s.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial -out server-cert.pem -days 30 \
    -extfile <(printf "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth") 2>/dev/null)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
qemu-nbd -r -t -f raw --shared=0 -x disk -b 127.0.0.1 -p "$PORT" \
    --object tls-creds-x509,id=tls0,dir="$PWD/pki",endpoint=server,verify-peer=off --tls-creds tls0 ds/testvm/testvm-flat.vmdk &
QPID=$!
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.1; done
t0=$(now)
"$BIN" export --nbd "nbds://127.0.0.1:$PORT/disk" --tls-ca pki/ca-cert.pem --changed-blocks changed.b64 \
    --base-id a --point-id b --compress none -o /dev/null >/dev/null 2>&1
t1=$(now)
row "cbtstream export --nbd (qemu-nbd, TLS, same blocks)" "$(echo "$t1 - $t0" | bc)"

# The naive baseline: one curl per changed area, in sequence, while a snapshot freezes the extent.
read -r SNAP TOKEN FILE < <("${VS[@]}" snapshot)
(umask 077; echo "Cookie: vmware_soap_session=$TOKEN" > cookie.hdr)   # not on curl's argv
unset TOKEN
t0=$(now)
while read -r a b; do
    curl -s -f --cacert "$CA" -H @cookie.hdr -r "$a-$b" -o /dev/null "$FILE"
done < areas.txt
t1=$(now)
"${VS[@]}" remove "$SNAP"
row "curl, one ranged GET per area ($(wc -l < areas.txt) areas)" "$(echo "$t1 - $t0" | bc)"
