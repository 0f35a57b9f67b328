#!/usr/bin/env bash
# Full exports from the XenServer simulator: a 4 GiB VDI with 10% of its 2 MiB blocks written
# (random data, scattered), exported in full twice: with the VHD allocation map (the default)
# and with it off (the simulator's GET /export_raw_vdi made to fail, so every byte is read).
# Reports bytes read over NBD, wall time and MB/s (release build, output to /dev/null, no
# compression). Then a restore of that stream into the simulator (PUT /import_raw_vdi) when
# `restore --xapi` exists, against a restore to a local raw file.
#
#   bench/xen_full.sh          # XEN_SIZE_GIB=4 XEN_PERCENT=10
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_GIB=${XEN_SIZE_GIB:-4}
PERCENT=${XEN_PERCENT:-10}
cargo build --release --quiet -p cbtstream -p cbtstream-xapi-sim
BIN=$PWD/target/release/cbtstream
SIM=$PWD/target/release/xapi-sim
work=$(mktemp -d /var/tmp/cbtstream-xen-bench.XXXXXX)
cleanup() {
    [ -n "${SIM_PID:-}" ] && kill "$SIM_PID" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
cd "$work"
"$SIM" --data-dir sim --disk-size $((SIZE_GIB << 30)) > sim.json 2> sim.log &
SIM_PID=$!
for _ in $(seq 200); do [ -s sim.json ] && break; sleep 0.05; done
read -r URL CA VDI PW < <(python3 -c 'import json; j=json.load(open("sim.json")); print(j["url"], j["ca"], j["vdi"], j["password"])')
export XAPI_PASSWORD=$PW

# The guest writes PERCENT% of the 2 MiB blocks with random data.
python3 - "$URL" "$CA" "$VDI" "$SIZE_GIB" "$PERCENT" <<'PY'
import base64, os, random, ssl, sys, xmlrpc.client
url, ca, vdi_uuid, gib, percent = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
ctx = ssl.create_default_context(cafile=ca); ctx.check_hostname = False
x = xmlrpc.client.ServerProxy(url, context=ctx)
s = x.session.login_with_password("root", os.environ["XAPI_PASSWORD"], "1.1", "bench")["Value"]
vdi = x.VDI.get_by_uuid(s, vdi_uuid)["Value"]
blocks = (gib << 30) // (2 << 20)
for b in random.Random(7).sample(range(blocks), blocks * percent // 100):
    r = x.sim.write(s, vdi, str(b * (2 << 20)), base64.b64encode(os.urandom(2 << 20)).decode())
    assert r["Status"] == "Success", r
x.session.logout(s)
PY

fail_vhd_export() {
    python3 - "$URL" "$CA" <<'PY'
import os, ssl, sys, xmlrpc.client
ctx = ssl.create_default_context(cafile=sys.argv[2]); ctx.check_hostname = False
x = xmlrpc.client.ServerProxy(sys.argv[1], context=ctx)
s = x.session.login_with_password("root", os.environ["XAPI_PASSWORD"], "1.1", "bench")["Value"]
assert x.sim.fail_next(s, "GET /export_raw_vdi", "INTERNAL_ERROR", ["off"], "always")["Status"] == "Success"
x.session.logout(s)
PY
}

run_case() {
    local name=$1 out=$2
    local t0 t1 json
    t0=$(date +%s.%N)
    json=$("$BIN" export --xapi "$URL" --xapi-ca "$CA" --vdi "$VDI" --full --compress none -o "$out" --json 2>&1 >/dev/null | grep '^{')
    t1=$(date +%s.%N)
    python3 - "$json" "$t0" "$t1" "$name" <<'PY'
import json, sys
j = json.loads(sys.argv[1])
wall = float(sys.argv[3]) - float(sys.argv[2])
read = j["bytes_read"]
print(f"| {sys.argv[4]} | {read:,} | {wall:.2f} | {read / wall / 1e6:.0f} |")
PY
}

echo "| full export of ${SIZE_GIB} GiB, ${PERCENT}% of the 2 MiB blocks written | bytes read over NBD | wall s | MB/s read |"
echo "|---|---|---|---|"
run_case "with the VHD allocation map" full-map.cbts
fail_vhd_export
run_case "allocation map off (every byte read)" full-all.cbts

# Restore of the stream: to a local raw file, and into the pool when restore --xapi exists.
t0=$(date +%s.%N); "$BIN" restore --to local.raw full-map.cbts 2>/dev/null; t1=$(date +%s.%N)
python3 -c 'import sys; w=float(sys.argv[2])-float(sys.argv[1]); print(f"\nrestore to a local raw file: {w:.2f} s")' "$t0" "$t1"
if "$BIN" restore --help | grep -q -- '--sr'; then
    SR=$(python3 - "$URL" "$CA" <<'PY'
import os, ssl, sys, xmlrpc.client
ctx = ssl.create_default_context(cafile=sys.argv[2]); ctx.check_hostname = False
x = xmlrpc.client.ServerProxy(sys.argv[1], context=ctx)
s = x.session.login_with_password("root", os.environ["XAPI_PASSWORD"], "1.1", "bench")["Value"]
sr = x.SR.get_all(s)["Value"][0]
print(x.SR.get_uuid(s, sr)["Value"])
x.session.logout(s)
PY
)
    t0=$(date +%s.%N); "$BIN" restore --xapi "$URL" --xapi-ca "$CA" --sr "$SR" full-map.cbts >/dev/null 2>&1; t1=$(date +%s.%N)
    python3 -c 'import sys; w=float(sys.argv[2])-float(sys.argv[1]); print(f"restore into the simulator (import_raw_vdi): {w:.2f} s")' "$t0" "$t1"
fi
echo
echo "$(date -u +%F), $(nproc) cores, $(uname -r), release build"
