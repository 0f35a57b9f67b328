#!/usr/bin/env bash
# The demo, on the embedded XenServer simulator (tests/xapi-sim): it speaks XenAPI over HTTPS,
# keeps real CBT logs over real disk images and serves snapshots over NBD with TLS, like a
# XenServer host. The story:
#   1. the guest writes data; a full export to a file (the chain's state file is created);
#   2. the guest writes more; the incremental export is piped straight into `restore`, and
#      committed with `cbtstream commit` once restore succeeded (a stream through a pipe is
#      pending until its reader says it is stored);
#   3. the restored image is compared with the VDI byte for byte; the host keeps only one
#      snapshot, of type cbt_metadata, as the base for the next run.
#
#   scripts/install-deps.sh && scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MIB=${DEMO_SIZE_MIB:-256}
cargo build --release --quiet -p cbtstream -p cbtstream-xapi-sim
BIN=$PWD/target/release/cbtstream
SIM=$PWD/target/release/xapi-sim
work=$(mktemp -d)
cleanup() {
    [ -n "${SIM_PID:-}" ] && kill "$SIM_PID" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
cd "$work"

echo "== XenServer simulator with a ${SIZE_MIB} MiB VDI, CBT on"
"$SIM" --data-dir sim --disk-size $((SIZE_MIB << 20)) > sim.json 2> sim.log &
SIM_PID=$!
for _ in $(seq 200); do [ -s sim.json ] && break; sleep 0.05; done
read -r URL CA VDI PW < <(python3 -c 'import json; j=json.load(open("sim.json")); print(j["url"], j["ca"], j["vdi"], j["password"])')
export XAPI_PASSWORD=$PW   # the password never goes on a command line
echo "   $URL  VDI $VDI"

# The guest writes, through the simulator's test API (sim.write), with Python's XML-RPC client.
guest_writes() {
    python3 - "$URL" "$CA" "$VDI" "$1" "$((SIZE_MIB << 20))" <<'PY'
import base64, os, random, ssl, sys, xmlrpc.client
url, ca, vdi_uuid, round_, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
ctx = ssl.create_default_context(cafile=ca); ctx.check_hostname = False
x = xmlrpc.client.ServerProxy(url, context=ctx)
s = x.session.login_with_password("root", os.environ["XAPI_PASSWORD"], "1.1", "demo")["Value"]
vdi = x.VDI.get_by_uuid(s, vdi_uuid)["Value"]
r = random.Random(round_)
text = b"".join(open(p, "rb").read() for p in ["/usr/share/common-licenses/GPL-3", "/usr/share/common-licenses/Apache-2.0"] if os.path.exists(p)) or b"lorem ipsum "
n = 24 if round_ == 1 else 40
written = 0
for i in range(n):
    length = r.choice([4096, 65536, 300_000, 1 << 20])
    off = r.randrange(0, size - length) // 512 * 512
    data = os.urandom(length) if i % 2 else (text * (length // len(text) + 1))[:length]
    res = x.sim.write(s, vdi, str(off), base64.b64encode(data).decode())
    assert res["Status"] == "Success", res
    written += length
print(f"   guest wrote {written} bytes in {n} writes")
x.session.logout(s)
PY
}

snapshots() {
    python3 - "$URL" "$CA" "$VDI" <<'PY'
import os, ssl, sys, xmlrpc.client
url, ca, vdi_uuid = sys.argv[1:4]
ctx = ssl.create_default_context(cafile=ca); ctx.check_hostname = False
x = xmlrpc.client.ServerProxy(url, context=ctx)
s = x.session.login_with_password("root", os.environ["XAPI_PASSWORD"], "1.1", "demo")["Value"]
vdi = x.VDI.get_by_uuid(s, vdi_uuid)["Value"]
for ref in x.VDI.get_snapshots(s, vdi)["Value"]:
    rec = x.VDI.get_record(s, ref)["Value"]
    print(f"   snapshot {rec['uuid']}: type {rec['type']}")
x.session.logout(s)
PY
}

XAPI=(--xapi "$URL" --xapi-ca "$CA" --vdi "$VDI" --state chain.json)

echo "== 1. guest writes, then a full export"
guest_writes 1
"$BIN" export "${XAPI[@]}" -o full.cbts --json
"$BIN" restore --to restored.raw full.cbts
cmp restored.raw "sim/$VDI.raw" && echo "   restored image == VDI"
snapshots

echo "== 2. guest writes, then an incremental piped into restore, committed when restore succeeded"
guest_writes 2
"$BIN" export "${XAPI[@]}" -o - --json | "$BIN" restore --to restored.raw - \
    && "$BIN" commit --xapi-ca "$CA" --state chain.json
cmp restored.raw "sim/$VDI.raw" && echo "   restored image == VDI after the incremental"
snapshots
echo "   chain state: $(python3 -c 'import json; j=json.load(open("chain.json")); print("base", j["base"], "cbt_metadata" if j["base_is_metadata"] else "full")')"
"$BIN" gc --xapi "$URL" --xapi-ca "$CA" --vdi "$VDI" --state chain.json --dry-run
echo "== demo OK"
