#!/usr/bin/env python3
"""Checks the XenServer simulator with the official XenAPI Python SDK (PyPI package XenAPI).

If the SDK, which real XenServer tools are built on, can drive the simulator, then the
simulator speaks real XenAPI: XML-RPC envelope, value encodings, method names, error codes.
The HTTP handlers (/export_raw_vdi, /import_raw_vdi, /export_metadata, /import_metadata) are
not XenAPI calls: Python's own http.client, tarfile and xmlrpc.client check them from outside,
and qemu-img reads the VHD export back.

Usage: .venv/bin/python3 tests/xapi_sdk.py [PATH_TO_XAPI_SIM]
(default: $XAPI_SIM, else target/debug/xapi-sim). Exit status 0 only if every check passed;
the last line is "N passed, M failed". scripts/install-deps.sh installs the SDK into the
project's virtual environment .venv/.
"""

import base64
import http.client
import io
import json
import os
import ssl
import struct
import subprocess
import sys
import tarfile
import tempfile
import traceback
import xmlrpc.client

import XenAPI

BLOCK = 64 * 1024
DISK_SIZE = 4 * 1024 * 1024 + 512  # a multiple of 512, not of 64 KiB: a partial last block

passed = 0
failed = 0


def check(name, fn):
    global passed, failed
    try:
        fn()
        passed += 1
        print(f"ok    {name}")
    except Exception:  # noqa: BLE001 - report every failure and go on
        failed += 1
        print(f"FAIL  {name}")
        traceback.print_exc()


def expect_failure(code, fn, *args):
    try:
        fn(*args)
    except XenAPI.Failure as e:
        assert e.details[0] == code, f"expected {code}, got {e.details}"
        return e.details
    raise AssertionError(f"expected {code}, the call succeeded")


def changed_blocks(b64, size):
    raw = base64.b64decode(b64)
    nblocks = (size + BLOCK - 1) // BLOCK
    assert len(raw) == (nblocks + 7) // 8, f"bitmap of {len(raw)} bytes for {nblocks} blocks"
    return [i for i in range(len(raw) * 8) if raw[i >> 3] & (0x80 >> (i & 7))]


def start_sim(binary, data_dir):
    proc = subprocess.Popen(
        [
            binary,
            "--listen", "127.0.0.1:0",
            "--data-dir", data_dir,
            "--disk-size", str(DISK_SIZE),
            "--nbd-lag-ms", "50",
            "--data-destroy-timeout-ms", "300",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    if not line:
        proc.wait(timeout=10)
        raise SystemExit(f"xapi-sim exited ({proc.returncode}) without its JSON line")
    return proc, json.loads(line)


def main():
    binary = (sys.argv[1] if len(sys.argv) > 1 else None) or os.environ.get(
        "XAPI_SIM", "target/debug/xapi-sim"
    )
    with tempfile.TemporaryDirectory(prefix="xapi-sim-py-") as data_dir:
        proc, info = start_sim(binary, data_dir)
        try:
            run(info)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
    print(f"{passed} passed, {failed} failed")
    return 1 if failed or passed == 0 else 0


def run(info):
    for key in ("url", "ca", "user", "password", "vm", "vdi"):
        assert key in info, f"the JSON line lacks {key}"
    assert info["url"].startswith("https://127.0.0.1:")

    session = XenAPI.Session(info["url"], ignore_ssl=True)
    state = {}

    def login():
        session.xenapi.login_with_password(info["user"], info["password"], "1.0", "xapi_sdk.py")
        assert session.handle.startswith("OpaqueRef:"), "the session is not an OpaqueRef"

    check("login_with_password", login)
    x = session.xenapi

    def vm_lookup():
        vm = x.VM.get_by_uuid(info["vm"])
        rec = x.VM.get_record(vm)
        assert rec["uuid"] == info["vm"]
        assert rec["power_state"] == "Running"
        assert rec["is_a_snapshot"] is False
        vbds = x.VM.get_VBDs(vm)
        assert sorted(vbds) == sorted(rec["VBDs"]) and len(vbds) == 2
        by_type = {}
        for r in vbds:
            vbd = x.VBD.get_record(r)
            assert vbd["VM"] == vm
            assert vbd["currently_attached"] is True
            by_type[vbd["type"]] = vbd
        disk, cd = by_type["Disk"], by_type["CD"]
        assert disk["userdevice"] == "0" and disk["empty"] is False
        assert cd["empty"] is True and cd["VDI"] == "OpaqueRef:NULL", cd
        state["vbd_vdi"] = disk["VDI"]

    check("VM and VBD records", vm_lookup)

    def vdi_record():
        vdi = x.VDI.get_by_uuid(info["vdi"])
        state["vdi"] = vdi
        assert vdi == state.get("vbd_vdi", vdi), "the VBD points at another VDI"
        rec = x.VDI.get_record(vdi)
        assert rec["uuid"] == info["vdi"]
        assert rec["type"] == "user"
        # Ints travel as decimal strings, booleans as booleans.
        assert rec["virtual_size"] == str(DISK_SIZE), rec["virtual_size"]
        assert rec["cbt_enabled"] is True
        assert rec["is_a_snapshot"] is False
        assert rec["snapshot_of"] == "OpaqueRef:NULL"
        assert rec["snapshots"] == []
        assert rec["other_config"] == {}
        assert rec["SR"].startswith("OpaqueRef:")
        assert x.VDI.get_uuid(vdi) == info["vdi"]
        assert x.VDI.get_type(vdi) == "user"
        assert x.VDI.get_virtual_size(vdi) == str(DISK_SIZE)
        assert x.VDI.get_cbt_enabled(vdi) is True
        assert x.VDI.get_is_a_snapshot(vdi) is False

    check("VDI lookup and record", vdi_record)

    def other_config():
        vdi = state["vdi"]
        x.VDI.add_to_other_config(vdi, "cbtstream", "1")
        expect_failure("MAP_DUPLICATE_KEY", x.VDI.add_to_other_config, vdi, "cbtstream", "2")
        assert x.VDI.get_other_config(vdi) == {"cbtstream": "1"}
        x.VDI.remove_from_other_config(vdi, "cbtstream")
        x.VDI.set_other_config(vdi, {"a": "b"})
        assert x.VDI.get_other_config(vdi) == {"a": "b"}
        x.VDI.set_other_config(vdi, {})

    check("other_config", other_config)

    def write(offset, data):
        x.sim.write(state["vdi"], str(offset), base64.b64encode(data).decode())

    def snapshots_and_changed_blocks():
        vdi = state["vdi"]
        write(100, b"before the first snapshot")
        s1 = x.VDI.snapshot(vdi, {})
        rec = x.VDI.get_record(s1)
        assert rec["is_a_snapshot"] is True
        assert rec["snapshot_of"] == vdi
        assert rec["cbt_enabled"] is True
        assert rec["other_config"] == {}
        assert s1 in x.VDI.get_snapshots(vdi)
        # Block 2, blocks 5-6 (across a boundary), and the partial last block (64).
        write(2 * BLOCK + 7, b"x" * 10)
        write(6 * BLOCK - 3, b"y" * 6)
        write(DISK_SIZE - 512, b"z" * 512)
        s2 = x.VDI.snapshot(vdi, {})
        state["s1"], state["s2"] = s1, s2
        got = changed_blocks(x.VDI.list_changed_blocks(s1, s2), DISK_SIZE)
        assert got == [2, 5, 6, 64], got

    check("snapshots and list_changed_blocks", snapshots_and_changed_blocks)

    def unrelated():
        details = expect_failure(
            "SR_BACKEND_FAILURE_460", x.VDI.list_changed_blocks, state["s2"], state["s1"]
        )
        assert "Source and target VDI are unrelated" in details[2], details

    check("list_changed_blocks of unrelated VDIs", unrelated)

    def nbd_info():
        infos = x.VDI.get_nbd_info(state["s2"])
        assert len(infos) == 1, infos
        rec = infos[0]
        uuid = x.VDI.get_uuid(state["s2"])
        assert rec["exportname"] == f"/{uuid}?session_id={session.handle}", rec["exportname"]
        assert rec["address"] == "127.0.0.1"
        assert rec["port"].isdigit() and 0 < int(rec["port"]) < 65536, rec["port"]
        assert rec["cert"].startswith("-----BEGIN CERTIFICATE-----")
        with open(info["ca"]) as f:
            assert rec["cert"].strip() == f.read().strip(), "cert is not the server's"
        assert rec["subject"] == "localhost"

    check("get_nbd_info", nbd_info)

    def data_destroy():
        s1 = state["s1"]
        expect_failure("OPERATION_NOT_ALLOWED", x.VDI.data_destroy, state["vdi"])
        x.VDI.data_destroy(s1)
        assert x.VDI.get_type(s1) == "cbt_metadata"
        x.VDI.data_destroy(s1)  # idempotent
        details = expect_failure("VDI_INCOMPATIBLE_TYPE", x.VDI.get_nbd_info, s1)
        assert details == ["VDI_INCOMPATIBLE_TYPE", s1, "cbt_metadata"], details
        # The metadata still works as the base of the next increment.
        write(0, b"after")
        s3 = x.VDI.snapshot(state["vdi"], {})
        got = changed_blocks(x.VDI.list_changed_blocks(s1, s3), DISK_SIZE)
        assert got == [0, 2, 5, 6, 64], got

    check("data_destroy and cbt_metadata", data_destroy)

    def sr_vdi_create_and_vbds():
        srs = x.SR.get_all()
        assert len(srs) == 1, srs
        assert x.SR.get_record(srs[0])["content_type"] == "user"
        # What the cbt sample cbt_import_whole_vdi.py sends.
        new = x.VDI.create({
            "SR": srs[0], "virtual_size": str(DISK_SIZE), "name_label": "CBT backup",
            "type": "user", "sharable": False, "read_only": False, "other_config": {},
        })
        state["new"] = new
        assert x.VDI.get_virtual_size(new) == str(DISK_SIZE)
        assert x.VDI.get_cbt_enabled(new) is False
        vm = x.VM.get_by_uuid(info["vm"])
        vbd = x.VBD.create({
            "VM": vm, "VDI": new, "userdevice": "autodetect", "bootable": False, "mode": "RW",
            "type": "Disk", "unpluggable": True, "empty": False, "other_config": {},
            "qos_algorithm_type": "", "qos_algorithm_params": {},
        })
        assert x.VBD.get_VDI(vbd) == new and x.VBD.get_userdevice(vbd) == "1"
        assert vbd in x.VM.get_VBDs(vm)
        expect_failure("VDI_IN_USE", x.VDI.destroy, state["vdi"])
        x.VBD.destroy(vbd)
        expect_failure("HANDLE_INVALID", x.VBD.get_record, vbd)
        scratch = x.VDI.create({
            "SR": srs[0], "virtual_size": "512", "type": "user", "sharable": False,
            "read_only": False, "other_config": {},
        })
        x.VDI.destroy(scratch)
        expect_failure("HANDLE_INVALID", x.VDI.get_record, scratch)

    check("SR, VDI.create, VBD.create and destroy", sr_vdi_create_and_vbds)

    def network_purposes():
        nets = x.network.get_all()
        assert len(nets) == 1, nets
        net = nets[0]
        assert x.network.get_purpose(net) == ["nbd"]
        assert x.network.get_record(net)["purpose"] == ["nbd"]
        x.network.remove_purpose(net, "nbd")
        assert x.VDI.get_nbd_info(state["s2"]) == []
        x.network.add_purpose(net, "insecure_nbd")
        details = expect_failure("NETWORK_INCOMPATIBLE_PURPOSES", x.network.add_purpose, net, "nbd")
        assert details[1:] == ["nbd", "insecure_nbd"], details
        x.network.remove_purpose(net, "insecure_nbd")
        x.network.add_purpose(net, "nbd")
        assert len(x.VDI.get_nbd_info(state["s2"])) == 1

    check("network purposes", network_purposes)

    host, port = info["url"][len("https://"):].rstrip("/").rsplit(":", 1)
    tls = ssl.create_default_context(cafile=info["ca"])
    tls.check_hostname = False  # the certificate names the host, the URL an address

    def https(method, path, body=None, headers=None):
        conn = http.client.HTTPSConnection(host, int(port), context=tls, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            data = resp.read()  # close-delimited bodies end when the server closes
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
        finally:
            conn.close()

    def image(uuid):
        with open(os.path.join(info["data_dir"], f"{uuid}.raw"), "rb") as f:
            return f.read()

    def http_exports():
        s, uuid = session.handle, info["vdi"]
        status, h, raw = https("GET", f"/export_raw_vdi?session_id={s}&vdi={uuid}&format=raw")
        assert status == 200 and "content-length" not in h, (status, h)
        assert raw == image(uuid), "the raw export differs from the disk"
        status, h, vhd = https("GET", f"/export_raw_vdi?session_id={s}&vdi={uuid}&format=vhd")
        assert status == 200 and h["content-type"] == "application/vhd", (status, h)
        assert vhd[:8] == b"conectix" and vhd[-512:] == vhd[:512]
        with tempfile.TemporaryDirectory() as d:
            src, dst = os.path.join(d, "a.vhd"), os.path.join(d, "a.raw")
            with open(src, "wb") as f:
                f.write(vhd)
            subprocess.run(
                ["qemu-img", "convert", "--image-opts",
                 f"driver=vpc,force_size_calc=current_size,file.filename={src}", "-O", "raw", dst],
                check=True,
            )
            with open(dst, "rb") as f:
                back = f.read()
        assert back[:DISK_SIZE] == raw and not back[DISK_SIZE:].strip(b"\0"), "qemu-img's copy differs"
        status, h, _ = https("GET", f"/export_raw_vdi?vdi={uuid}")
        assert status == 401 and h["www-authenticate"] == 'Basic realm="xapi"', (status, h)
        state["raw"], state["vhd"] = raw, vhd

    check("HTTP export_raw_vdi (raw, vhd) with http.client and qemu-img", http_exports)

    def http_imports():
        s, new = session.handle, state["new"]
        new_uuid = x.VDI.get_uuid(new)
        task = x.task.create("import", "xapi_sdk.py")
        status, h, _ = https(
            "PUT", f"/import_raw_vdi?session_id={s}&vdi={new_uuid}&format=raw&task_id={task}",
            body=state["raw"],
        )
        assert status == 200 and h["task-id"] == task, (status, h)
        assert x.task.get_status(task) == "success", x.task.get_error_info(task)
        assert x.task.get_result(task) == f"<value>{new}</value>"
        assert image(new_uuid) == state["raw"]
        body = struct.pack("<QI", 512, 1024) + b"c" * 1024 + bytes(12)
        status, h, _ = https("PUT", f"/import_raw_vdi?session_id={s}&vdi={new}&chunked=true", body=body)
        assert status == 200 and x.task.get_status(h["task-id"]) == "success"
        assert image(new_uuid) == state["raw"][:512] + b"c" * 1024 + state["raw"][1536:]
        # The VHD export replaces block 0, the only one holding data, chunk included.
        status, h, _ = https("PUT", f"/import_raw_vdi?session_id={s}&vdi={new}&format=vhd", body=state["vhd"])
        assert status == 200 and x.task.get_status(h["task-id"]) == "success"
        assert image(new_uuid) == state["raw"]
        # The running VM's disk is refused.
        status, h, body = https("PUT", f"/import_raw_vdi?session_id={s}&vdi={info['vdi']}", body=b"x" * 512)
        assert status == 200 and body.startswith(b"HTTP/1.1 500"), (status, body[:40])
        assert x.task.get_error_info(h["task-id"])[0] == "VDI_IN_USE"

    check("HTTP import_raw_vdi (plain, chunked, vhd) with http.client", http_imports)

    def http_metadata():
        s, vm_uuid = session.handle, info["vm"]
        status, h, archive = https(
            "GET", f"/export_metadata?session_id={s}&uuid={vm_uuid}&export_snapshots=false"
        )
        assert status == 200 and int(h["content-length"]) == len(archive), (status, h)
        with tarfile.open(fileobj=io.BytesIO(archive)) as t:
            assert t.getnames() == ["ova.xml"], t.getnames()
            xml = t.extractfile("ova.xml").read().decode()
        (ova,), _ = xmlrpc.client.loads(
            f"<methodResponse><params><param>{xml}</param></params></methodResponse>"
        )
        classes = sorted(o["class"] for o in ova["objects"])
        assert classes == ["SR", "VBD", "VBD", "VDI", "VM"], classes
        assert ova["version"]["export_vsn"] == 2
        new = state["new"]
        mapping = f"vdi:{info['vdi']}={x.VDI.get_uuid(new)}"
        task = x.task.create("metadata import", "")
        status, h, _ = https(
            "PUT", f"/import_metadata?session_id={s}&task_id={task}&{mapping}", body=archive
        )
        assert status == 200 and x.task.get_status(task) == "success", x.task.get_error_info(task)
        (refs,), _ = xmlrpc.client.loads(
            "<methodResponse><params><param>" + x.task.get_result(task)
            + "</param></params></methodResponse>"
        )
        assert len(refs) == 1, refs
        rec = x.VM.get_record(refs[0])
        assert rec["power_state"] == "Halted" and rec["uuid"] != vm_uuid
        disks = [x.VBD.get_VDI(b) for b in rec["VBDs"] if x.VBD.get_type(b) == "Disk"]
        assert disks == [new], disks

    check("HTTP export_metadata / import_metadata with tarfile and xmlrpc.client", http_metadata)

    def bad_password():
        other = XenAPI.Session(info["url"], ignore_ssl=True)
        expect_failure(
            "SESSION_AUTHENTICATION_FAILED",
            other.xenapi.login_with_password,
            info["user"],
            "wrong " + info["password"],
        )

    check("bad password", bad_password)

    def unknown_method():
        expect_failure("MESSAGE_METHOD_UNKNOWN", x.VDI.no_such_method, state["vdi"])

    check("unknown method", unknown_method)

    def logout():
        handle = session.handle
        x.session.logout()
        # A raw call with the old session: SESSION_INVALID (the SDK itself would log in again).
        raw = XenAPI.Session(info["url"], ignore_ssl=True)
        res = getattr(raw, "VDI.get_record")(handle, state["vdi"])
        assert res["Status"] == "Failure", res
        assert res["ErrorDescription"] == ["SESSION_INVALID", handle], res["ErrorDescription"]

    check("logout", logout)


if __name__ == "__main__":
    sys.exit(main())
