#!/usr/bin/env bash
# Backups into a repository: a local directory against the local S3 server (s3s-fs, which
# stores objects in a directory on the same disk). A VM with one 4 GiB disk, 10% of its 2 MiB
# blocks written with random data: a full backup, 10% more written, an incremental, into each
# repository (release build, zstd level 1). Reports wall time, MB/s of stream stored and the
# S3/dir throughput ratio (issue 11's target: at least 0.7x).
#
#   bench/repo.sh          # REPO_SIZE_GIB=4 REPO_PERCENT=10
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_GIB=${REPO_SIZE_GIB:-4}
PERCENT=${REPO_PERCENT:-10}
cargo build --release --quiet -p cbtstream -p cbtstream-xapi-sim
BIN=$PWD/target/release/cbtstream
SIM=$PWD/target/release/xapi-sim
command -v s3s-fs >/dev/null || { echo "s3s-fs missing: run scripts/install-deps.sh" >&2; exit 1; }
work=$(mktemp -d /var/tmp/cbtstream-repo-bench.XXXXXX)
cleanup() {
    [ -n "${SIM_PID:-}" ] && kill "$SIM_PID" 2>/dev/null || true
    [ -n "${S3_PID:-}" ] && kill "$S3_PID" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
cd "$work"
"$SIM" --data-dir sim --disk-size $((SIZE_GIB << 30)) > sim.json 2> sim.log &
SIM_PID=$!
mkdir -p s3/bench
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
s3s-fs --host 127.0.0.1 --port "$PORT" --access-key bench --secret-key benchsecret s3 > s3.log 2>&1 &
S3_PID=$!
for _ in $(seq 200); do [ -s sim.json ] && grep -q "server is running" s3.log && break; sleep 0.05; done
read -r URL CA VM VDI PW < <(python3 -c 'import json; j=json.load(open("sim.json")); print(j["url"], j["ca"], j["vm"], j["vdi"], j["password"])')
export XAPI_PASSWORD=$PW AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=benchsecret AWS_REGION=us-east-1

guest_writes() {
    python3 - "$URL" "$CA" "$VDI" "$SIZE_GIB" "$PERCENT" "$1" <<'PY'
import base64, os, random, ssl, sys, xmlrpc.client
url, ca, vdi_uuid, gib, percent, seed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
ctx = ssl.create_default_context(cafile=ca); ctx.check_hostname = False
x = xmlrpc.client.ServerProxy(url, context=ctx)
s = x.session.login_with_password("root", os.environ["XAPI_PASSWORD"], "1.1", "bench")["Value"]
vdi = x.VDI.get_by_uuid(s, vdi_uuid)["Value"]
blocks = (gib << 30) // (2 << 20)
for b in random.Random(seed).sample(range(blocks), blocks * percent // 100):
    r = x.sim.write(s, vdi, str(b * (2 << 20)), base64.b64encode(os.urandom(2 << 20)).decode())
    assert r["Status"] == "Success", r
x.session.logout(s)
PY
}

"$BIN" repo init dir-repo >/dev/null
"$BIN" repo init s3://bench/repo --s3-endpoint "http://127.0.0.1:$PORT" >/dev/null

backup() { # name repo extra...
    local name=$1 repo=$2; shift 2
    local t0 t1 json
    t0=$(date +%s.%N)
    json=$("$BIN" backup --xapi "$URL" --xapi-ca "$CA" --vm "$VM" --repo "$repo" "$@" --json 2>&1 >/dev/null | grep '^{')
    t1=$(date +%s.%N)
    python3 - "$json" "$t0" "$t1" "$name" <<'PY'
import json, sys
j = json.loads(sys.argv[1])
wall = float(sys.argv[3]) - float(sys.argv[2])
print(f"| {sys.argv[4]} | {j['bytes_written']:,} | {wall:.2f} | {j['bytes_written'] / wall / 1e6:.0f} |")
PY
}

echo "| backup of a ${SIZE_GIB} GiB disk (${PERCENT}% written) | stream bytes | wall s | MB/s stored |"
echo "|---|---|---|---|"
guest_writes 7
# Each repository keeps its own chain (state.json in the repository): two chains of one VM.
backup "full, local directory" dir-repo
backup "full, S3 (s3s-fs)" s3://bench/repo --s3-endpoint "http://127.0.0.1:$PORT"
guest_writes 8
backup "incremental, local directory" dir-repo
backup "incremental, S3 (s3s-fs)" s3://bench/repo --s3-endpoint "http://127.0.0.1:$PORT"
