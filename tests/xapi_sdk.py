#!/usr/bin/env python3
"""Checks the XenServer simulator with the official XenAPI Python SDK (PyPI package XenAPI).

If the SDK, which real XenServer tools are built on, can drive the simulator, then the
simulator speaks real XenAPI: XML-RPC envelope, value encodings, method names, error codes.

Usage: .venv/bin/python3 tests/xapi_sdk.py [PATH_TO_XAPI_SIM]
(default: $XAPI_SIM, else target/debug/xapi-sim). Exit status 0 only if every check passed;
the last line is "N passed, M failed". scripts/install-deps.sh installs the SDK into the
project's virtual environment .venv/.
"""

import base64
import json
import os
import subprocess
import sys
import tempfile
import traceback

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
        assert vbds == rec["VBDs"] and len(vbds) == 1
        vbd = x.VBD.get_record(vbds[0])
        assert vbd["VM"] == vm
        assert vbd["type"] == "Disk"
        assert vbd["currently_attached"] is True
        state["vbd_vdi"] = vbd["VDI"]

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
