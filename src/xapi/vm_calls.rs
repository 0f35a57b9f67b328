//! Typed VM and VBD calls for whole-VM backups, parsed as strictly as the VDI calls.

use super::calls::{as_ref, as_refs, Fields};
use super::{Ref, XapiError, XapiSession};

/// The fields of a VM record the VM flow uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmRecord {
    pub uuid: String,
    pub name_label: String,
    pub is_a_snapshot: bool,
    pub vbds: Vec<Ref>,
}

/// The fields of a VBD record the VM flow uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VbdRecord {
    /// `Disk`, `CD` or `Floppy`.
    pub vbd_type: String,
    /// The slot (`userdevice`: "0", "1", ...).
    pub userdevice: String,
    /// `None` for an empty drive.
    pub vdi: Option<Ref>,
}

impl XapiSession {
    pub async fn vm_get_by_uuid(&self, uuid: &str) -> Result<Ref, XapiError> {
        const M: &str = "VM.get_by_uuid";
        as_ref(M, "the result", self.call(M, &[uuid.into()]).await?)
    }

    pub async fn vm_get_record(&self, vm: &Ref) -> Result<VmRecord, XapiError> {
        const M: &str = "VM.get_record";
        let v = self.call(M, &[vm.into()]).await?;
        let r = Fields::of(M, &v)?;
        Ok(VmRecord {
            uuid: r.string("uuid")?,
            name_label: r.string("name_label")?,
            is_a_snapshot: r.bool("is_a_snapshot")?,
            vbds: r.refs("VBDs")?,
        })
    }

    /// `VM.snapshot(vm, name)`: one crash-consistent snapshot of every disk; the snapshot VM.
    pub async fn vm_snapshot(&self, vm: &Ref, name: &str) -> Result<Ref, XapiError> {
        const M: &str = "VM.snapshot";
        as_ref(
            M,
            "the result",
            self.call(M, &[vm.into(), name.into()]).await?,
        )
    }

    pub async fn vm_get_snapshots(&self, vm: &Ref) -> Result<Vec<Ref>, XapiError> {
        const M: &str = "VM.get_snapshots";
        as_refs(M, "the result", &self.call(M, &[vm.into()]).await?)
    }

    /// Destroys a (halted, snapshot) VM record; its VDIs stay.
    pub async fn vm_destroy(&self, vm: &Ref) -> Result<(), XapiError> {
        self.call("VM.destroy", &[vm.into()]).await.map(drop)
    }

    pub async fn vbd_get_record(&self, vbd: &Ref) -> Result<VbdRecord, XapiError> {
        const M: &str = "VBD.get_record";
        let v = self.call(M, &[vbd.into()]).await?;
        let r = Fields::of(M, &v)?;
        Ok(VbdRecord {
            vbd_type: r.string("type")?,
            userdevice: r.string("userdevice")?,
            vdi: r.opt_ref("VDI")?,
        })
    }
}
