//! Typed calls for the export and restore flows. Responses are parsed strictly against XAPI's
//! encodings (ints as decimal strings, `<boolean>`, refs as `OpaqueRef:` strings); an
//! error names the method and the field, never its value.

use super::{Ref, Secret, XapiError, XapiSession};
use cbtstream_proto::xmlrpc::Value;
use std::collections::BTreeMap;

/// The fields of a VDI record the flow uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VdiRecord {
    pub uuid: String,
    pub name_label: String,
    /// `type`: `user`, `system`, `cbt_metadata`, ...
    pub vdi_type: String,
    pub virtual_size: u64,
    pub cbt_enabled: bool,
    pub is_a_snapshot: bool,
    /// `None` when XAPI says `OpaqueRef:NULL`.
    pub snapshot_of: Option<Ref>,
    pub snapshots: Vec<Ref>,
    pub other_config: BTreeMap<String, String>,
    /// `SR`.
    pub sr: Ref,
    /// `snapshot_time` as XAPI sends it (`YYYYMMDDTHH:MM:SSZ`, so it sorts as text); `None`
    /// when the record has none.
    pub snapshot_time: Option<String>,
}

/// One way to reach a VDI over NBD (a `vdi_nbd_server_info` record).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdInfo {
    pub address: String,
    pub port: u16,
    /// The server's leaf certificate, PEM (`cert`).
    pub cert_pem: String,
    /// A DNS name of the certificate, to use as the TLS server name.
    pub subject: String,
    /// `/<vdi-uuid>?session_id=<session ref>`: carries the session, so it is secret.
    pub exportname: Secret,
}

impl XapiSession {
    pub async fn vdi_get_by_uuid(&self, uuid: &str) -> Result<Ref, XapiError> {
        const M: &str = "VDI.get_by_uuid";
        as_ref(M, "the result", self.call(M, &[uuid.into()]).await?)
    }

    pub async fn vdi_get_record(&self, vdi: &Ref) -> Result<VdiRecord, XapiError> {
        const M: &str = "VDI.get_record";
        let v = self.call(M, &[vdi.into()]).await?;
        let r = Fields::of(M, &v)?;
        Ok(VdiRecord {
            uuid: r.string("uuid")?,
            name_label: r.string("name_label")?,
            vdi_type: r.string("type")?,
            virtual_size: r.u64("virtual_size")?,
            cbt_enabled: r.bool("cbt_enabled")?,
            is_a_snapshot: r.bool("is_a_snapshot")?,
            snapshot_of: r.opt_ref("snapshot_of")?,
            snapshots: r.refs("snapshots")?,
            other_config: r.string_map("other_config")?,
            sr: r.r#ref("SR")?,
            snapshot_time: r.opt_datetime("snapshot_time")?,
        })
    }

    /// `VDI.snapshot(vdi, driver_params)`: the new snapshot.
    pub async fn vdi_snapshot(
        &self,
        vdi: &Ref,
        driver_params: BTreeMap<String, String>,
    ) -> Result<Ref, XapiError> {
        const M: &str = "VDI.snapshot";
        let v = self
            .call(M, &[vdi.into(), string_map(driver_params)])
            .await?;
        as_ref(M, "the result", v)
    }

    /// The base64 bitmap of blocks changed between two snapshots (decode it with
    /// `cbtstream_proto::cbt`). Call it before opening NBD connections to `to`.
    pub async fn vdi_list_changed_blocks(&self, from: &Ref, to: &Ref) -> Result<String, XapiError> {
        const M: &str = "VDI.list_changed_blocks";
        self.call(M, &[from.into(), to.into()])
            .await?
            .into_string()
            .ok_or_else(|| XapiError::protocol(M, "the result is not a string"))
    }

    /// One record per (host with the SR attached) × (NBD network address); empty when no
    /// network has the `nbd`/`insecure_nbd` purpose.
    pub async fn vdi_get_nbd_info(&self, vdi: &Ref) -> Result<Vec<NbdInfo>, XapiError> {
        const M: &str = "VDI.get_nbd_info";
        let v = self.call(M, &[vdi.into()]).await?;
        let items = v
            .as_array()
            .ok_or_else(|| XapiError::protocol(M, "the result is not an array"))?;
        items
            .iter()
            .map(|item| {
                let r = Fields::of(M, item)?;
                let port = r.u64("port")?;
                Ok(NbdInfo {
                    address: r.string("address")?,
                    port: u16::try_from(port)
                        .map_err(|_| r.bad("port", "out of range for a TCP port"))?,
                    cert_pem: r.string("cert")?,
                    subject: r.string("subject")?,
                    exportname: Secret::from(r.string("exportname")?),
                })
            })
            .collect()
    }

    /// Delete a snapshot's data, keeping its CBT log (the VDI becomes `cbt_metadata`).
    /// Fails with `VDI_IN_USE` while dom0 still has it attached (open NBD connections, for a
    /// few seconds after they close): wrap it in [`super::retry_on`].
    pub async fn vdi_data_destroy(&self, vdi: &Ref) -> Result<(), XapiError> {
        self.void("VDI.data_destroy", &[vdi.into()]).await
    }

    pub async fn vdi_destroy(&self, vdi: &Ref) -> Result<(), XapiError> {
        self.void("VDI.destroy", &[vdi.into()]).await
    }

    /// Idempotent.
    pub async fn vdi_enable_cbt(&self, vdi: &Ref) -> Result<(), XapiError> {
        self.void("VDI.enable_cbt", &[vdi.into()]).await
    }

    /// Fails with `MAP_DUPLICATE_KEY` if `key` is already set: remove it first to replace.
    pub async fn vdi_add_to_other_config(
        &self,
        vdi: &Ref,
        key: &str,
        value: &str,
    ) -> Result<(), XapiError> {
        self.void(
            "VDI.add_to_other_config",
            &[vdi.into(), key.into(), value.into()],
        )
        .await
    }

    /// A no-op when `key` is not set.
    pub async fn vdi_remove_from_other_config(
        &self,
        vdi: &Ref,
        key: &str,
    ) -> Result<(), XapiError> {
        self.void("VDI.remove_from_other_config", &[vdi.into(), key.into()])
            .await
    }

    pub async fn vdi_get_uuid(&self, vdi: &Ref) -> Result<String, XapiError> {
        self.string("VDI.get_uuid", vdi).await
    }

    #[allow(dead_code)] // part of the client's API; not needed by the flows yet
    pub async fn vdi_get_type(&self, vdi: &Ref) -> Result<String, XapiError> {
        self.string("VDI.get_type", vdi).await
    }

    pub async fn vdi_get_snapshots(&self, vdi: &Ref) -> Result<Vec<Ref>, XapiError> {
        const M: &str = "VDI.get_snapshots";
        let v = self.call(M, &[vdi.into()]).await?;
        as_refs(M, "the result", &v)
    }

    async fn string(&self, method: &str, vdi: &Ref) -> Result<String, XapiError> {
        self.call(method, &[vdi.into()])
            .await?
            .into_string()
            .ok_or_else(|| XapiError::protocol(method, "the result is not a string"))
    }

    pub async fn sr_get_by_uuid(&self, uuid: &str) -> Result<Ref, XapiError> {
        const M: &str = "SR.get_by_uuid";
        as_ref(M, "the result", self.call(M, &[uuid.into()]).await?)
    }

    /// `VDI.create` of a plain read-write `user` disk with the fields XAPI requires
    /// (docs/XENSERVER.md section 11). The host may round `virtual_size` up.
    pub async fn vdi_create(
        &self,
        sr: &Ref,
        virtual_size: u64,
        name_label: &str,
        other_config: BTreeMap<String, String>,
    ) -> Result<Ref, XapiError> {
        const M: &str = "VDI.create";
        let size = i64::try_from(virtual_size)
            .map_err(|_| XapiError::protocol(M, "the size does not fit XenAPI's int"))?;
        let record = Value::record([
            ("SR", sr.into()),
            ("virtual_size", Value::int64_str(size)),
            ("name_label", name_label.into()),
            ("name_description", "".into()),
            ("type", "user".into()),
            ("sharable", Value::Bool(false)),
            ("read_only", Value::Bool(false)),
            ("other_config", string_map(other_config)),
        ]);
        as_ref(M, "the result", self.call(M, &[record]).await?)
    }

    /// Grows (or, where the SR allows it, shrinks) the VDI to `size` bytes.
    pub async fn vdi_resize(&self, vdi: &Ref, size: u64) -> Result<(), XapiError> {
        let size = i64::try_from(size)
            .map_err(|_| XapiError::protocol("VDI.resize", "the size does not fit"))?;
        self.void("VDI.resize", &[vdi.into(), Value::int64_str(size)])
            .await
    }

    /// Sets `key` to `value`, replacing any value it had.
    pub async fn vdi_set_other_config_key(
        &self,
        vdi: &Ref,
        key: &str,
        value: &str,
    ) -> Result<(), XapiError> {
        self.vdi_remove_from_other_config(vdi, key).await?;
        self.vdi_add_to_other_config(vdi, key, value).await
    }

    pub async fn vdi_get_vbds(&self, vdi: &Ref) -> Result<Vec<Ref>, XapiError> {
        const M: &str = "VDI.get_VBDs";
        let v = self.call(M, &[vdi.into()]).await?;
        as_refs(M, "the result", &v)
    }

    pub async fn vbd_get_currently_attached(&self, vbd: &Ref) -> Result<bool, XapiError> {
        const M: &str = "VBD.get_currently_attached";
        self.call(M, &[vbd.into()])
            .await?
            .as_bool()
            .ok_or_else(|| XapiError::protocol(M, "the result is not a boolean"))
    }

    pub async fn vbd_get_vm(&self, vbd: &Ref) -> Result<Ref, XapiError> {
        const M: &str = "VBD.get_VM";
        as_ref(M, "the result", self.call(M, &[vbd.into()]).await?)
    }

    /// `Halted`, `Paused`, `Running` or `Suspended`.
    pub async fn vm_get_power_state(&self, vm: &Ref) -> Result<String, XapiError> {
        self.string("VM.get_power_state", vm).await
    }

    pub async fn vm_get_uuid(&self, vm: &Ref) -> Result<String, XapiError> {
        self.string("VM.get_uuid", vm).await
    }

    /// `pending`, `success`, `failure`, `cancelling` or `cancelled`.
    pub async fn task_get_status(&self, task: &Ref) -> Result<String, XapiError> {
        self.string("task.get_status", task).await
    }

    /// A finished task's result (for an import: an XML-RPC value, as text).
    pub async fn task_get_result(&self, task: &Ref) -> Result<String, XapiError> {
        self.string("task.get_result", task).await
    }

    /// A failed task's error code and arguments.
    pub async fn task_get_error_info(&self, task: &Ref) -> Result<Vec<String>, XapiError> {
        const M: &str = "task.get_error_info";
        let v = self.call(M, &[task.into()]).await?;
        v.as_array()
            .ok_or_else(|| XapiError::protocol(M, "the result is not an array"))?
            .iter()
            .map(|s| {
                s.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| XapiError::protocol(M, "an element is not a string"))
            })
            .collect()
    }

    /// A call returning void (XAPI sends an empty `<value></value>`; anything is accepted).
    async fn void(&self, method: &str, params: &[Value]) -> Result<(), XapiError> {
        self.call(method, params).await.map(drop)
    }
}

impl From<&Ref> for Value {
    fn from(r: &Ref) -> Value {
        Value::String(r.as_str().to_owned())
    }
}

fn string_map(m: BTreeMap<String, String>) -> Value {
    Value::Struct(m.into_iter().map(|(k, v)| (k, Value::String(v))).collect())
}

pub(super) fn as_ref(method: &str, what: &str, v: Value) -> Result<Ref, XapiError> {
    v.into_string()
        .and_then(Ref::parse)
        .ok_or_else(|| XapiError::protocol(method, format!("{what} is not an OpaqueRef")))
}

pub(super) fn as_refs(method: &str, what: &str, v: &Value) -> Result<Vec<Ref>, XapiError> {
    v.as_array()
        .ok_or_else(|| XapiError::protocol(method, format!("{what} is not an array")))?
        .iter()
        .map(|r| {
            r.as_str()
                .and_then(|s| Ref::parse(s.to_owned()))
                .ok_or_else(|| {
                    XapiError::protocol(method, format!("an element of {what} is not an OpaqueRef"))
                })
        })
        .collect()
}

/// The members of a record, read with errors that name the field.
pub(super) struct Fields<'a> {
    method: &'static str,
    map: &'a BTreeMap<String, Value>,
}

impl<'a> Fields<'a> {
    pub(super) fn of(method: &'static str, v: &'a Value) -> Result<Fields<'a>, XapiError> {
        let map = v
            .as_struct()
            .ok_or_else(|| XapiError::protocol(method, "the result is not a struct"))?;
        Ok(Fields { method, map })
    }

    fn bad(&self, field: &str, why: &str) -> XapiError {
        XapiError::protocol(self.method, format!("field {field:?} is {why}"))
    }

    fn get(&self, field: &str) -> Result<&'a Value, XapiError> {
        self.map
            .get(field)
            .ok_or_else(|| self.bad(field, "missing"))
    }

    fn wrong(&self, field: &str, expected: &str, got: &Value) -> XapiError {
        self.bad(
            field,
            &format!("a {} where {expected} was expected", got.type_name()),
        )
    }

    pub(super) fn string(&self, field: &str) -> Result<String, XapiError> {
        let v = self.get(field)?;
        v.as_str()
            .map(str::to_owned)
            .ok_or_else(|| self.wrong(field, "a string", v))
    }

    /// XAPI's `int`: a decimal string (an explicit `<int>`/`<i8>` is accepted too).
    pub(super) fn u64(&self, field: &str) -> Result<u64, XapiError> {
        let v = self.get(field)?;
        v.as_u64()
            .ok_or_else(|| self.bad(field, "not a non-negative integer"))
    }

    pub(super) fn bool(&self, field: &str) -> Result<bool, XapiError> {
        let v = self.get(field)?;
        v.as_bool().ok_or_else(|| self.wrong(field, "a boolean", v))
    }

    fn opt_datetime(&self, field: &str) -> Result<Option<String>, XapiError> {
        match self.map.get(field) {
            None => Ok(None),
            Some(v) => v
                .as_datetime()
                .map(|s| Some(s.to_owned()))
                .ok_or_else(|| self.wrong(field, "a dateTime.iso8601", v)),
        }
    }

    pub(super) fn r#ref(&self, field: &str) -> Result<Ref, XapiError> {
        let v = self.get(field)?;
        v.as_str()
            .and_then(|s| Ref::parse(s.to_owned()))
            .ok_or_else(|| self.bad(field, "not an OpaqueRef"))
    }

    pub(super) fn opt_ref(&self, field: &str) -> Result<Option<Ref>, XapiError> {
        let r = self.r#ref(field)?;
        Ok((!r.is_null()).then_some(r))
    }

    pub(super) fn refs(&self, field: &str) -> Result<Vec<Ref>, XapiError> {
        as_refs(self.method, &format!("field {field:?}"), self.get(field)?)
    }

    pub(super) fn string_map(&self, field: &str) -> Result<BTreeMap<String, String>, XapiError> {
        let v = self.get(field)?;
        let m = v
            .as_struct()
            .ok_or_else(|| self.wrong(field, "a struct", v))?;
        m.iter()
            .map(|(k, v)| match v.as_str() {
                Some(s) => Ok((k.clone(), s.to_owned())),
                None => Err(self.bad(field, "a map with a non-string value")),
            })
            .collect()
    }
}
