//! The VI/JSON methods (`POST /sdk/vim25/{release}/{type}/{moid}/{method}`) and property reads,
//! with the session check every call but the two bootstrap ones goes through. Snapshot, CBT
//! and task methods live in `snapshots`.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::json::{moref, now, Fault};
use crate::state::{Session, Shared, State, Ticket};
use crate::{props, snapshots};

/// The HTTP header carrying the session token (Login's answer, every later request).
pub const SESSION_HEADER: &str = "vmware-api-session-id";

/// A method's answer.
#[derive(Debug)]
pub enum Reply {
    /// 200 with this JSON body.
    Json(Value),
    /// 204, no body (a void method, or an unset value).
    Void,
    /// 200 with the UserSession, and the new token in the session header.
    LoggedIn { token: String, body: Value },
}

/// Why a call has no answer.
#[derive(Debug)]
pub enum CallError {
    /// HTTP 500 with the fault body.
    Fault(Fault),
    /// HTTP 404: no such method or property in the API.
    NoSuchPath,
}

impl From<Fault> for CallError {
    fn from(f: Fault) -> CallError {
        CallError::Fault(f)
    }
}

pub(crate) type CallResult = Result<Reply, CallError>;

/// The session behind `token`, if it is live.
pub fn session_user(st: &State, token: Option<&str>) -> Option<String> {
    st.sessions.get(token?).map(|s| s.user.clone())
}

pub(crate) fn field<'a>(body: &'a Value, name: &str) -> Result<&'a Value, Fault> {
    body.get(name).filter(|v| !v.is_null()).ok_or_else(|| {
        Fault::invalid_argument(
            name,
            format!("A specified parameter was not correct: {name}"),
        )
    })
}

pub(crate) fn str_field<'a>(body: &'a Value, name: &str) -> Result<&'a str, Fault> {
    field(body, name)?
        .as_str()
        .ok_or_else(|| Fault::invalid_argument(name, format!("{name} must be a string")))
}

pub(crate) fn moref_value<'a>(v: &'a Value, typ: &str, name: &str) -> Result<&'a str, Fault> {
    let bad = || Fault::invalid_argument(name, format!("{name} must be a {typ} reference"));
    if v.get("type").and_then(Value::as_str) != Some(typ) {
        return Err(bad());
    }
    v.get("value").and_then(Value::as_str).ok_or_else(bad)
}

/// Dispatches one method call. `token` is the request's session header.
pub fn call(
    shared: &Arc<Shared>,
    token: Option<&str>,
    typ: &str,
    moid: &str,
    method: &str,
    body: &Value,
) -> CallResult {
    let mut st = shared.lock();
    st.count(method);
    if (typ, moid, method) == ("SessionManager", "SessionManager", "Login") {
        return login(&mut st, body);
    }
    let Some(user) = session_user(&st, token) else {
        return Err(Fault::not_authenticated().into());
    };
    if let Some(f) = (!method.ends_with("_Task"))
        .then(|| st.take_failure(method))
        .flatten()
    {
        return Err(f.into());
    }
    match (typ, method) {
        ("SessionManager", "Logout") if moid == "SessionManager" => {
            if let Some(t) = token {
                st.sessions.remove(t);
            }
            Ok(Reply::Void)
        }
        ("SessionManager", "AcquireGenericServiceTicket") if moid == "SessionManager" => {
            generic_ticket(&mut st, body)
        }
        ("SearchIndex", "FindByUuid") if moid == "SearchIndex" => find_by_uuid(&st, body),
        ("VirtualMachine", "QueryChangedDiskAreas") => snapshots::query_changed(&st, moid, body),
        ("VirtualMachine", "ReconfigVM_Task") => {
            snapshots::reconfig(shared, &mut st, &user, moid, body)
        }
        ("VirtualMachine", "CreateSnapshotEx_Task" | "CreateSnapshot_Task") => {
            snapshots::create_snapshot(shared, &mut st, &user, moid, method, body)
        }
        ("VirtualMachineSnapshot", "RemoveSnapshot_Task") => {
            snapshots::remove_snapshot(shared, &mut st, &user, moid, body)
        }
        ("Datastore", "UpdateVirtualMachineFiles_Task") => {
            update_vm_files(shared, &mut st, &user, moid, body)
        }
        _ => Err(CallError::NoSuchPath),
    }
}

fn user_session(st: &State, s: &Session) -> Value {
    json!({
        "_typeName": "UserSession",
        "key": s.key,
        "userName": s.user,
        "fullName": s.user,
        "loginTime": s.login_time,
        "lastActiveTime": now(),
        "locale": "en",
        "messageLocale": "en",
        "extensionSession": false,
        "ipAddress": "127.0.0.1",
        "userAgent": "",
        "callCount": st.calls.values().sum::<u64>()
    })
}

pub fn current_session(st: &State, token: Option<&str>) -> Option<Value> {
    st.sessions.get(token?).map(|s| user_session(st, s))
}

fn login(st: &mut State, body: &Value) -> CallResult {
    let user = str_field(body, "userName")?;
    let password = str_field(body, "password")?;
    if user != st.user || password != st.password {
        return Err(Fault::new(
            "InvalidLogin",
            "Cannot complete login due to an incorrect user name or password.",
        )
        .into());
    }
    let token = new_secret();
    let session = Session {
        user: user.to_owned(),
        key: uuid::Uuid::new_v4().to_string(),
        login_time: now(),
        by_file_service: false,
    };
    let body = user_session(st, &session);
    st.sessions.insert(token.clone(), session);
    Ok(Reply::LoggedIn { token, body })
}

/// A session token or ticket: 160 random bits in hex.
pub fn new_secret() -> String {
    let a = uuid::Uuid::new_v4().simple().to_string();
    let b = uuid::Uuid::new_v4().simple().to_string();
    format!("{a}{}", &b[..8])
}

fn generic_ticket(st: &mut State, body: &Value) -> CallResult {
    let spec = field(body, "spec")?;
    if spec.get("_typeName").and_then(Value::as_str) != Some("SessionManagerHttpServiceRequestSpec")
    {
        return Err(Fault::invalid_argument(
            "spec",
            "spec must be a SessionManagerHttpServiceRequestSpec",
        )
        .into());
    }
    let method = spec
        .get("method")
        .and_then(Value::as_str)
        .unwrap_or("httpGet");
    let url = str_field(spec, "url")?;
    let path_and_query = url
        .strip_prefix("https://")
        .and_then(|rest| rest.find('/').map(|i| &rest[i..]))
        .ok_or_else(|| Fault::invalid_argument("url", "url must be an https URL"))?;
    let id = new_secret();
    st.tickets.insert(
        id.clone(),
        Ticket {
            path_and_query: path_and_query.to_owned(),
            method: method.to_owned(),
        },
    );
    Ok(Reply::Json(json!({
        "_typeName": "SessionManagerGenericServiceTicket",
        "id": id,
        "hostName": "127.0.0.1"
    })))
}

fn find_by_uuid(st: &State, body: &Value) -> CallResult {
    let uuid = str_field(body, "uuid")?.to_ascii_lowercase();
    let vm_search = field(body, "vmSearch")?.as_bool().unwrap_or(false);
    let instance = body
        .get("instanceUuid")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if !vm_search {
        return Ok(Reply::Void);
    }
    let found = st.vms.iter().find(|v| {
        let id = if instance {
            &v.instance_uuid
        } else {
            &v.bios_uuid
        };
        id.eq_ignore_ascii_case(&uuid)
    });
    Ok(match found {
        Some(v) => Reply::Json(moref("VirtualMachine", &v.moid)),
        None => Reply::Void,
    })
}

fn update_vm_files(
    shared: &Arc<Shared>,
    st: &mut State,
    user: &str,
    moid: &str,
    body: &Value,
) -> CallResult {
    let ds = st
        .datastore(moid)
        .ok_or_else(|| Fault::object_not_found("Datastore", moid))?;
    let ds_name = ds.name.clone();
    let pairs = field(body, "mountPathDatastoreMapping")?
        .as_array()
        .filter(|a| !a.is_empty())
        .ok_or_else(|| {
            Fault::invalid_argument("mountPathDatastoreMapping", "the mapping is empty")
        })?;
    let mut seen: Vec<(String, String)> = Vec::new();
    for p in pairs {
        let old = str_field(p, "oldMountPath")?.to_owned();
        let target = moref_value(field(p, "datastore")?, "Datastore", "datastore")?.to_owned();
        if st.datastore(&target).is_none() {
            return Err(Fault::invalid_argument(
                "datastore",
                format!("The datastore {target} cannot be found"),
            )
            .into());
        }
        if seen.iter().any(|(o, t)| *o == old && *t != target) {
            return Err(Fault::invalid_argument(
                "mountPathDatastoreMapping",
                format!("The old mount path {old} is mapped to more than one datastore"),
            )
            .into());
        }
        seen.push((old, target));
    }
    if moid == crate::state::DATASTORE_MOID && !st.vms.is_empty() {
        return Err(Fault::new(
            "ResourceInUse",
            format!("The datastore {ds_name} has registered virtual machines"),
        )
        .with("type", json!("Datastore"))
        .with("name", json!(ds_name))
        .into());
    }
    let prefix = format!("[{ds_name}] ");
    snapshots::start_task(
        shared,
        st,
        user,
        "UpdateVirtualMachineFiles_Task",
        "Datastore.updateVirtualMachineFiles",
        moref("Datastore", moid),
        &ds_name,
        Box::new(move |st| {
            let failed: Vec<Value> = st
                .unupdatable_files
                .iter()
                .filter(|f| f.starts_with(&prefix))
                .map(|f| {
                    json!({
                        "_typeName": "UpdateVirtualMachineFilesResultFailedVmFileInfo",
                        "vmFile": f,
                        "fault": Fault::new("FileFault", format!("Cannot update {f}"))
                            .with("file", json!(f))
                            .to_json()
                    })
                })
                .collect();
            let mut result = json!({"_typeName": "UpdateVirtualMachineFilesResult"});
            if !failed.is_empty() {
                result["failedVmFile"] = json!(failed);
            }
            Ok(Some(result))
        }),
    )
}

/// The task delay's default: long enough that a client sees `queued`/`running` when it
/// polls at once.
pub const DEFAULT_TASK_DELAY: Duration = Duration::from_millis(20);

/// `GET` of a property (plus `SessionManager.currentSession`, which needs the token).
pub fn get(st: &mut State, token: Option<&str>, typ: &str, moid: &str, prop: &str) -> CallResult {
    st.count(&format!("GET {prop}"));
    if (typ, moid, prop) == ("ServiceInstance", "ServiceInstance", "content") {
        return Ok(Reply::Json(props::service_content(st)));
    }
    if session_user(st, token).is_none() {
        return Err(Fault::not_authenticated().into());
    }
    if (typ, moid, prop) == ("SessionManager", "SessionManager", "currentSession") {
        return Ok(current_session(st, token).map_or(Reply::Void, Reply::Json));
    }
    match props::get(st, typ, moid, prop) {
        Ok(Some(v)) => Ok(Reply::Json(v)),
        Ok(None) => Ok(Reply::Void),
        Err(()) if props::known_type(typ) && !props::exists(st, typ, moid) => {
            Err(Fault::object_not_found(typ, moid).into())
        }
        Err(()) => Err(CallError::NoSuchPath),
    }
}
