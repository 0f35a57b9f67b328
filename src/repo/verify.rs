//! `cbtstream verify --repo LOCATION [--vm UUID] [--read-data]`: checks that what the
//! repository keeps restores, and changes nothing (no lock taken, nothing written or
//! removed; a backup running meanwhile shows as an incomplete point, a note).
//!
//! For every point: its point.json reads; the point's chain and each disk's chain resolve
//! through the points that are there; every stream it lists is there and its SHA-256 is
//! the one point.json records. With `--read-data` every stream is also decoded (each
//! record's checksum, the trailer, the stream digest) and its header checked against the
//! chain: source id = the disk's id, size = point.json's, full exactly when point.json has
//! no base, base id = the point id of the base point's stream of that disk. Streams are
//! read through [`ObjectReader`] on blocking threads; with `--read-data` twice (hashed,
//! then decoded), so that a damaged stream is reported both ways.

use super::reader::ObjectReader;
use super::restore::disk_links;
use super::store::{valid_name, ObjectInfo, StoreError};
use super::{point_dir, points_dir, Points, Repo, RepoError, StoredPoint, POINT_LIMIT};
use crate::restore::verified::{open_stream, Payloads};
use crate::restore::{RestoreError, StreamInput};
use crate::xen::point::{PointInfo, POINT_FILE};
use cbtstream_proto::stream::Header;
use std::collections::{BTreeMap, HashMap};
use std::io::Read;

/// Something damaged or missing.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Problem {
    pub vm: String,
    pub point: String,
    pub file: String,
    pub problem: String,
}

/// Something worth knowing that is not damage: a point directory without point.json.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Note {
    pub vm: String,
    pub point: String,
    pub note: String,
}

#[derive(Debug, Default, serde::Serialize)]
pub struct VerifyReport {
    pub vms: usize,
    pub points: usize,
    pub streams: u64,
    /// Stream bytes read (both reads with `--read-data`).
    pub bytes: u64,
    pub problems: Vec<Problem>,
    pub notes: Vec<Note>,
}

impl VerifyReport {
    fn problem(&mut self, vm: &str, point: &str, file: &str, problem: impl Into<String>) {
        self.problems.push(Problem {
            vm: vm.to_owned(),
            point: point.to_owned(),
            file: file.to_owned(),
            problem: problem.into(),
        });
    }

    /// What `verify` prints: a line per problem and note, then a summary.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for n in &self.notes {
            out.push_str(&format!(
                "note: VM {} point {}: {}\n",
                n.vm, n.point, n.note
            ));
        }
        for p in &self.problems {
            out.push_str(&format!(
                "DAMAGED: VM {} point {} {}: {}\n",
                p.vm, p.point, p.file, p.problem
            ));
        }
        out.push_str(&format!(
            "verified {} point(s) of {} VM(s), {} stream(s), {} bytes read: {}\n",
            self.points,
            self.vms,
            self.streams,
            self.bytes,
            match self.problems.len() {
                0 => "no problems".to_owned(),
                n => format!("{n} problem(s)"),
            }
        ));
        out
    }

    /// `--json`: `{"points", "problems": [{vm, point, file, problem}], "ok", ...}`.
    pub fn json_value(&self) -> serde_json::Value {
        serde_json::json!({
            "vms": self.vms,
            "points": self.points,
            "streams": self.streams,
            "bytes": self.bytes,
            "problems": self.problems,
            "notes": self.notes,
            "ok": self.problems.is_empty(),
        })
    }
}

/// Verifies every point of `vm` (or of every VM). An error is a repository that cannot be
/// read; damage is in the report.
pub async fn verify(
    repo: &Repo,
    vm: Option<&str>,
    read_data: bool,
) -> Result<VerifyReport, RepoError> {
    let vms = match vm {
        Some(v) => vec![v.to_owned()],
        None => repo.vms().await?,
    };
    let mut report = VerifyReport {
        vms: vms.len(),
        ..Default::default()
    };
    for vm in &vms {
        let points = load_points(repo, vm, &mut report).await?;
        report.points += points.points.len();
        let mut headers = HashMap::new();
        for p in &points.points {
            verify_point(repo, vm, &points, p, read_data, &mut headers, &mut report).await?;
        }
    }
    Ok(report)
}

/// The points of `vm` as [`Repo::points`] finds them, except that a point.json that does
/// not read is a problem of that point rather than an error, and directories without one
/// are notes.
async fn load_points(
    repo: &Repo,
    vm: &str,
    report: &mut VerifyReport,
) -> Result<Points, RepoError> {
    let mut by_dir: BTreeMap<String, Vec<ObjectInfo>> = BTreeMap::new();
    for o in repo.store.list(&points_dir(vm)).await? {
        // vms/<vm>/points/<point>/<file>
        let parts: Vec<&str> = o.key.split('/').collect();
        if parts.len() == 5 {
            by_dir.entry(parts[3].to_owned()).or_default().push(o);
        }
    }
    let mut points = Points::default();
    for (id, files) in by_dir {
        let key = format!("{}/{POINT_FILE}", point_dir(vm, &id));
        if !files.iter().any(|f| f.key == key) {
            report.notes.push(Note {
                vm: vm.to_owned(),
                point: id,
                note: format!(
                    "not a point: {} object(s) without {POINT_FILE}, left by a run that did \
                     not finish (the next backup or prune of the VM removes them)",
                    files.len()
                ),
            });
            continue;
        }
        let text = match repo.store.get(&key, POINT_LIMIT).await {
            Ok(Some(text)) => text,
            // Removed since the listing (a prune): not a point any more.
            Ok(None) => continue,
            Err(StoreError::TooLarge { limit, .. }) => {
                report.problem(vm, &id, POINT_FILE, format!("larger than {limit} bytes"));
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        match serde_json::from_slice::<PointInfo>(&text) {
            Ok(info) if info.id == id && info.vm == vm => {
                points.points.push(StoredPoint { info, files })
            }
            Ok(info) => report.problem(
                vm,
                &id,
                POINT_FILE,
                format!("it names point {} of VM {}", info.id, info.vm),
            ),
            Err(e) => report.problem(vm, &id, POINT_FILE, format!("does not read: {e}")),
        }
    }
    points.sort_oldest_first();
    Ok(points)
}

/// What `--read-data` learned of a stream's header, by (point, disk id).
type Headers = HashMap<(String, String), Header>;

async fn verify_point(
    repo: &Repo,
    vm: &str,
    points: &Points,
    p: &StoredPoint,
    read_data: bool,
    headers: &mut Headers,
    report: &mut VerifyReport,
) -> Result<(), RepoError> {
    let id = &p.info.id;
    let chain_ok = match points.chain(id) {
        Ok(_) => true,
        Err(e) => {
            report.problem(vm, id, POINT_FILE, e);
            false
        }
    };
    for d in &p.info.disks {
        if !valid_name(&d.stream) {
            report.problem(vm, id, &d.stream, "not a file name");
            continue;
        }
        // A missing point is reported once, above, not once per disk.
        if chain_ok {
            if let Err(e) = disk_links(points, vm, id, &d.id) {
                report.problem(vm, id, &d.stream, e);
            }
        }
        let key = format!("{}/{}", point_dir(vm, id), d.stream);
        if !p.files.iter().any(|f| f.key == key) {
            report.problem(vm, id, &d.stream, "missing");
            continue;
        }
        report.streams += 1;
        let (sha256, bytes) = sha256_object(repo, &key).await?;
        report.bytes += bytes;
        if sha256 != d.sha256 {
            report.problem(
                vm,
                id,
                &d.stream,
                format!(
                    "its SHA-256 is {sha256}, point.json records {}: the stream was damaged",
                    d.sha256
                ),
            );
        }
        if !read_data {
            continue;
        }
        let header = match decode_object(repo, &key).await? {
            (Ok(h), bytes) => {
                report.bytes += bytes;
                h
            }
            (Err(e), bytes) => {
                report.bytes += bytes;
                // The problem names the file already.
                let problem = match e {
                    RestoreError::Damaged { error, .. } => error.to_string(),
                    other => other.to_string(),
                };
                report.problem(vm, id, &d.stream, problem);
                continue;
            }
        };
        let base_header = d
            .base
            .as_ref()
            .and_then(|b| headers.get(&(b.clone(), d.id.clone())));
        for mismatch in header_mismatches(&header, d, base_header) {
            report.problem(vm, id, &d.stream, mismatch);
        }
        headers.insert((id.clone(), d.id.clone()), header);
    }
    Ok(())
}

/// How a stream's header disagrees with point.json and with its base stream's header
/// (`None` when the base did not verify: that was reported already).
fn header_mismatches(
    h: &Header,
    d: &crate::xen::point::PointDisk,
    base: Option<&Header>,
) -> Vec<String> {
    let mut found = Vec::new();
    if h.source_id != d.id {
        found.push(format!(
            "its header's source id is {:?}, not the disk's id {}",
            h.source_id, d.id
        ));
    }
    if h.virtual_size != d.size {
        found.push(format!(
            "its header's disk size is {}, not the {} point.json records",
            h.virtual_size, d.size
        ));
    }
    match (&d.base, h.is_full()) {
        (None, false) => found.push("an incremental stream where point.json has a full one".into()),
        (Some(b), true) => found.push(format!(
            "a full stream where point.json has an incremental on point {b}"
        )),
        _ => {}
    }
    if let (Some(b), Some(bh)) = (&d.base, base) {
        if h.base_id.as_deref() != Some(bh.point_id.as_str()) {
            found.push(format!(
                "its header's base id is {:?}, but point {b}'s stream of the disk is point {:?}",
                h.base_id.as_deref().unwrap_or(""),
                bh.point_id
            ));
        }
    }
    found
}

/// Reading an object failed for a reason that is not damage (stopped, permissions, the
/// network): the repository cannot be read.
fn read_error(repo: &Repo, key: &str, source: std::io::Error) -> RepoError {
    RepoError::Store(StoreError::Io {
        what: repo.store.describe(key),
        source,
    })
}

/// SHA-256 of an object (lowercase hex) and its length, read on a blocking thread.
async fn sha256_object(repo: &Repo, key: &str) -> Result<(String, u64), RepoError> {
    let mut reader = ObjectReader::open(&repo.store, key).await?;
    tokio::task::spawn_blocking(move || {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            ctx.update(&buf[..n]);
            total += n as u64;
        }
        let hex: String = ctx
            .finish()
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok((hex, total))
    })
    .await
    .map_err(std::io::Error::other)
    .and_then(|r| r)
    .map_err(|e| read_error(repo, key, e))
}

/// Decodes a whole stream object (every record's checksum, the trailer, the digest): its
/// header when it verified, else what is wrong; and the bytes read.
async fn decode_object(
    repo: &Repo,
    key: &str,
) -> Result<(Result<Header, RestoreError>, u64), RepoError> {
    let reader = ObjectReader::open(&repo.store, key).await?;
    let name = repo.store.describe(key);
    let decoded = tokio::task::spawn_blocking(move || {
        let stream = open_stream(StreamInput::Reader {
            name,
            reader: Box::new(reader),
        })?;
        let header = stream.header.clone();
        let verified = stream.verify(&mut Payloads::new()?, |_| Ok(()))?;
        Ok((header, verified.input_bytes))
    })
    .await
    .map_err(|e| read_error(repo, key, std::io::Error::other(e)))?;
    match decoded {
        Ok((header, bytes)) => Ok((Ok(header), bytes)),
        Err(RestoreError::Input { error, .. }) => Err(read_error(repo, key, error)),
        Err(e) => Ok((Err(e), 0)),
    }
}
