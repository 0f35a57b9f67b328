//! `cbtstream list --repo LOCATION [--vm UUID] [--json]`.

use super::{Repo, RepoError, StoredPoint};

/// One row of `list`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Listed {
    pub id: String,
    pub vm: String,
    pub name: String,
    pub time: String,
    /// `full` or `incremental`.
    pub kind: &'static str,
    /// The point it depends on, or null for a full one.
    pub base: Option<String>,
    pub disks: usize,
    /// Bytes stored for the point.
    pub bytes: u64,
}

impl Listed {
    fn of(p: &StoredPoint) -> Listed {
        Listed {
            id: p.info.id.clone(),
            vm: p.info.vm.clone(),
            name: p.info.name.clone(),
            time: p.info.time.clone(),
            kind: if p.info.base.is_some() {
                "incremental"
            } else {
                "full"
            },
            base: p.info.base.clone(),
            disks: p.info.disks.len(),
            bytes: p.bytes(),
        }
    }
}

/// Every point (of `vm`, or of every VM), by VM then oldest first.
pub async fn list(repo: &Repo, vm: Option<&str>) -> Result<Vec<Listed>, RepoError> {
    let vms = match vm {
        Some(v) => vec![v.to_owned()],
        None => repo.vms().await?,
    };
    let mut rows = Vec::new();
    for vm in vms {
        rows.extend(repo.points(&vm).await?.points.iter().map(Listed::of));
    }
    Ok(rows)
}

/// The table `list` prints.
pub fn table(rows: &[Listed]) -> String {
    let mut out = format!(
        "{:<36}  {:<20}  {:<11}  {:>5}  {:>14}  {}\n",
        "POINT", "TIME", "KIND", "DISKS", "BYTES", "DEPENDS ON"
    );
    let mut vm = None;
    for r in rows {
        if vm != Some(&r.vm) {
            out.push_str(&format!("VM {} ({})\n", r.vm, r.name));
            vm = Some(&r.vm);
        }
        out.push_str(&format!(
            "{:<36}  {:<20}  {:<11}  {:>5}  {:>14}  {}\n",
            r.id,
            r.time,
            r.kind,
            r.disks,
            r.bytes,
            r.base.as_deref().unwrap_or("-")
        ));
    }
    out
}
