//! VI/JSON value shapes: managed object references, faults, anyType wrapping, timestamps.
//!
//! Every object carries its `_typeName` (the "Using Polymorphic Types with the JSON Protocol"
//! guide recommends it on all objects, and govmomi's encoder writes it everywhere).

use serde_json::{json, Value};

/// `{"_typeName":"ManagedObjectReference","type":T,"value":V}` (schema MoRef*).
pub fn moref(typ: &str, value: &str) -> Value {
    json!({"_typeName": "ManagedObjectReference", "type": typ, "value": value})
}

/// A MoRef in an anyType slot (`TaskInfo.result`), wrapped in `_value` as the polymorphic
/// types guide's example shows.
pub fn moref_any(typ: &str, value: &str) -> Value {
    json!({"_typeName": "ManagedObjectReference", "_value": {"type": typ, "value": value}})
}

/// A fault the way VI/JSON sends it: the fault data object with `_typeName`, MethodFault's
/// `faultMessage` list, plus the fault's own fields.
#[derive(Debug, Clone)]
pub struct Fault {
    pub type_name: String,
    pub message: String,
    /// The fault type's own properties (`invalidProperty`, `file`, `obj`, ...).
    pub fields: serde_json::Map<String, Value>,
}

impl Fault {
    pub fn new(type_name: &str, message: impl Into<String>) -> Fault {
        Fault {
            type_name: type_name.into(),
            message: message.into(),
            fields: serde_json::Map::new(),
        }
    }

    pub fn with(mut self, key: &str, value: Value) -> Fault {
        self.fields.insert(key.into(), value);
        self
    }

    /// `InvalidArgument` naming the offending request property.
    pub fn invalid_argument(property: &str, message: impl Into<String>) -> Fault {
        Fault::new("InvalidArgument", message).with("invalidProperty", json!(property))
    }

    pub fn not_authenticated() -> Fault {
        Fault::new("NotAuthenticated", "The session is not authenticated.")
            .with("object", moref("SessionManager", "SessionManager"))
            .with("privilegeId", json!("System.View"))
    }

    pub fn object_not_found(typ: &str, value: &str) -> Fault {
        Fault::new(
            "ManagedObjectNotFound",
            format!("The object '{typ}:{value}' has already been deleted or has not been completely created"),
        )
        .with("obj", moref(typ, value))
    }

    /// The HTTP 500 body.
    pub fn to_json(&self) -> Value {
        let mut m = serde_json::Map::new();
        m.insert("_typeName".into(), json!(self.type_name));
        m.insert(
            "faultMessage".into(),
            json!([{
                "_typeName": "LocalizableMessage",
                "key": format!("vim.fault.{}", self.type_name),
                "message": self.message,
            }]),
        );
        for (k, v) in &self.fields {
            m.insert(k.clone(), v.clone());
        }
        Value::Object(m)
    }

    /// `TaskInfo.error`: a LocalizedMethodFault wrapping the fault.
    pub fn to_localized(&self) -> Value {
        json!({
            "_typeName": "LocalizedMethodFault",
            "fault": self.to_json(),
            "localizedMessage": self.message,
        })
    }
}

/// xsd:dateTime in UTC with milliseconds, as vCenter writes it: `2026-11-30T03:23:35.123Z`.
pub fn datetime(unix_millis: u128) -> String {
    let secs = (unix_millis / 1000) as i64;
    let ms = (unix_millis % 1000) as u32;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

pub fn now() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    datetime(ms)
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datetime_formats_known_instants() {
        assert_eq!(datetime(0), "1970-01-01T00:00:00.000Z");
        // 2026-11-30T03:23:35.123Z
        assert_eq!(datetime(1_796_009_015_123), "2026-11-30T03:23:35.123Z");
        assert_eq!(datetime(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }
}
