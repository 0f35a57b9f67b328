#!/usr/bin/env bash
# The demo, on the embedded XenServer simulator (tests/xapi-sim): it speaks XenAPI over HTTPS,
# keeps real CBT logs over real disk images and serves snapshots over NBD with TLS, like a
# XenServer host. The story, on a VM with two disks:
#   1. the guest writes data on both disks; a full backup of the VM (`backup`: one point
#      directory with the VM's metadata and one stream per disk; full exports read only the
#      blocks the snapshot's VHD allocates);
#   2. the guest writes more; an incremental backup;
#   3. the latest point restored into the pool as a new VM (`restore-vm`), whose disks are
#      compared byte for byte with the VM's, slot by slot; the host keeps one cbt_metadata
#      snapshot per disk as the base for the next run (`gc --dry-run` shows nothing to remove);
#   4. VMware vSphere, on the vSphere simulator (tests/vsphere-sim, VI/JSON): a full and an
#      incremental backup of a VM with two disks into a repository (its chain state kept
#      there), restored from it and compared with the VM's disks; `gc --vsphere` finds no
#      snapshot left;
#   5. the XenServer VM into the same repository: four backups with guest writes between,
#      the latest point restored from it and compared, then `prune --keep-last 2` (the
#      oldest kept point merged into a synthetic full) and `verify --read-data` of both VMs.
# (A single disk piped through `| restore` and committed with `cbtstream commit`: README.)
#
#   scripts/install-deps.sh && scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MIB=${DEMO_SIZE_MIB:-256}
cargo build --release --quiet -p cbtstream -p cbtstream-xapi-sim -p cbtstream-vsphere-sim
BIN=$PWD/target/release/cbtstream
SIM=$PWD/target/release/xapi-sim
VSIM=$PWD/target/release/vsphere-sim
work=$(mktemp -d)
cleanup() {
    [ -n "${SIM_PID:-}" ] && kill "$SIM_PID" 2>/dev/null || true
    [ -n "${VSIM_PID:-}" ] && kill "$VSIM_PID" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
cd "$work"

echo "== XenServer simulator: a VM with two ${SIZE_MIB} MiB disks, CBT on"
"$SIM" --data-dir sim --disks 2 --disk-size $((SIZE_MIB << 20)) > sim.json 2> sim.log &
SIM_PID=$!
for _ in $(seq 200); do [ -s sim.json ] && break; sleep 0.05; done
read -r URL CA VDI VDI2 VM PW < <(python3 -c 'import json; j=json.load(open("sim.json")); print(j["url"], j["ca"], j["disks"][0], j["disks"][1], j["vm"], j["password"])')
export XAPI_PASSWORD=$PW   # the password never goes on a command line
echo "   $URL  VM $VM, disks $VDI $VDI2"

# The guest writes, through the simulator's test API (sim.write), with Python's XML-RPC client.
guest_writes() {
    python3 - "$URL" "$CA" "${2:-$VDI}" "$1" "$((SIZE_MIB << 20))" <<'PY'
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
    python3 - "$URL" "$CA" "$1" <<'PY'
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

# The disks of a VM, slot by slot, as "slot vdi-uuid" lines.
vm_disks() {
    python3 - "$URL" "$CA" "$1" <<'PY'
import os, ssl, sys, xmlrpc.client
url, ca, vm_uuid = sys.argv[1:4]
ctx = ssl.create_default_context(cafile=ca); ctx.check_hostname = False
x = xmlrpc.client.ServerProxy(url, context=ctx)
s = x.session.login_with_password("root", os.environ["XAPI_PASSWORD"], "1.1", "demo")["Value"]
vm = x.VM.get_by_uuid(s, vm_uuid)["Value"]
disks = []
for vbd in x.VM.get_VBDs(s, vm)["Value"]:
    r = x.VBD.get_record(s, vbd)["Value"]
    if r["type"] == "Disk":
        disks.append((int(r["userdevice"]), x.VDI.get_uuid(s, r["VDI"])["Value"]))
for slot, uuid in sorted(disks):
    print(slot, uuid)
x.session.logout(s)
PY
}

SR=$(python3 - "$URL" "$CA" <<'PY'
import os, ssl, sys, xmlrpc.client
ctx = ssl.create_default_context(cafile=sys.argv[2]); ctx.check_hostname = False
x = xmlrpc.client.ServerProxy(sys.argv[1], context=ctx)
s = x.session.login_with_password("root", os.environ["XAPI_PASSWORD"], "1.1", "demo")["Value"]
print(x.SR.get_uuid(s, x.SR.get_all(s)["Value"][0])["Value"])
x.session.logout(s)
PY
)
mkdir points
BACKUP=(backup --xapi "$URL" --xapi-ca "$CA" --vm "$VM" --out points --state vm.json)

echo "== 1. guest writes on both disks, then a full backup of the VM"
guest_writes 1 "$VDI"; guest_writes 3 "$VDI2"
point=$("$BIN" "${BACKUP[@]}" --json)
echo "   point directory: $point ($(ls "$point" | tr '\n' ' '))"

echo "== 2. guest writes, then an incremental backup"
guest_writes 2 "$VDI"; guest_writes 4 "$VDI2"
point=$("$BIN" "${BACKUP[@]}" --json)
python3 -c 'import json,sys; p=json.load(open(sys.argv[1]+"/point.json")); print("   point", p["id"], "after", p["base"], "disks", [(d["slot"], d["stream"], d["base"] is not None) for d in p["disks"]])' "$point"

echo "== 3. the latest point restored into the pool as a new VM"
NEW_VM=$("$BIN" restore-vm --xapi "$URL" --xapi-ca "$CA" --sr "$SR" "$point")
echo "   new VM $NEW_VM"
paste <(vm_disks "$VM") <(vm_disks "$NEW_VM") | while read -r slot old slot2 new; do
    [ "$slot" = "$slot2" ] || { echo "slots differ: $slot $slot2"; exit 1; }
    cmp "sim/$old.raw" "sim/$new.raw" && echo "   slot $slot: restored disk == the VM's disk"
done
for d in "$VDI" "$VDI2"; do snapshots "$d"; done
"$BIN" gc --xapi "$URL" --xapi-ca "$CA" --vm "$VM" --state vm.json --dry-run

echo "== 4. VMware vSphere (simulator): a full and an incremental backup into a repository"
"$BIN" repo init repo
"$VSIM" --listen 127.0.0.1:0 --data-dir vsim --disks 2 > vsim.json 2> vsim.log &
VSIM_PID=$!
for _ in $(seq 200); do [ -s vsim.json ] && break; sleep 0.05; done
read -r VURL VCA VUSER VVM < <(python3 -c 'import json; j=json.load(open("vsim.json")); print(j["url"], j["ca"], j["user"], j["vm"])')
export VSPHERE_PASSWORD; VSPHERE_PASSWORD=$(python3 -c 'import json; print(json.load(open("vsim.json"))["password"])')
# Guest writes through the simulator's test API (POST /sim/write, with a logged-in session).
vsphere_writes() {
    python3 - "$VURL" "$VCA" "$VUSER" "$VVM" "$1" <<'PY'
import base64, json, os, random, ssl, sys, urllib.request
url, ca, user, vm, round_ = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
ctx = ssl.create_default_context(cafile=ca); ctx.check_hostname = False
def post(path, body, token=None):
    req = urllib.request.Request(url.rstrip("/") + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    if token:
        req.add_header("vmware-api-session-id", token)
    return urllib.request.urlopen(req, context=ctx)
login = post("/sdk/vim25/8.0.2.0/SessionManager/SessionManager/Login", {"userName": user, "password": os.environ["VSPHERE_PASSWORD"]})
token = login.headers["vmware-api-session-id"]
r = random.Random(round_)
for key in (2000, 2001):
    for _ in range(12):
        length = r.choice([513, 4096, 70_001, 300_000])
        off = r.randrange(0, (64 << 20) - length)
        post("/sim/write", {"vm": vm, "disk": key, "offset": off, "data": base64.b64encode(os.urandom(length)).decode()}, token)
print("   guest wrote on both disks")
PY
}
VBACKUP=(backup --vsphere "$VURL" --vsphere-ca "$VCA" --user "$VUSER" --vm "$VVM" --repo repo)
vsphere_writes 1
"$BIN" "${VBACKUP[@]}" >/dev/null
vsphere_writes 2
"$BIN" "${VBACKUP[@]}" >/dev/null
"$BIN" list --repo repo --vm "$VVM"
mkdir vrestored
"$BIN" restore --repo repo --vm "$VVM" --point latest --to vrestored
cmp vsim/testvm/testvm-flat.vmdk vrestored/disk2000.raw && cmp vsim/testvm/testvm_1-flat.vmdk vrestored/disk2001.raw \
    && echo "   the latest vSphere point, restored from the repository == the VM's disks"
"$BIN" gc --vsphere "$VURL" --vsphere-ca "$VCA" --user "$VUSER" --vm "$VVM" --repo repo
echo "   gc --vsphere: no snapshot left on the VM"

echo "== 5. XenServer into the same repository: four backups, prune to the last two, verify"
for r in 5 6 7 8; do
    guest_writes "$r" "$VDI"
    "$BIN" backup --xapi "$URL" --xapi-ca "$CA" --vm "$VM" --repo repo >/dev/null
done
"$BIN" list --repo repo --vm "$VM"
mkdir restored
"$BIN" restore --repo repo --vm "$VM" --point latest --to restored
cmp "sim/$VDI.raw" restored/disk0.raw && cmp "sim/$VDI2.raw" restored/disk1.raw \
    && echo "   the latest point, restored from the repository == the VM's disks"
"$BIN" prune --repo repo --vm "$VM" --keep-last 2
"$BIN" verify --repo repo --read-data

echo "== demo OK"
