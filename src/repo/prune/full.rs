//! Making a kept point full: each incremental disk merged from its chain into a new stream
//! of the point's directory, read back and verified, then point.json replaced.

use super::{kill_point, MergedStream, PruneError};
use crate::engine::sink::FinishingWriter;
use crate::merge::{merge_into, MergeError, MergeReport};
use crate::repo::reader::ObjectReader;
use crate::repo::store::{valid_name, Store};
use crate::repo::upload::{self, Stored};
use crate::repo::{point_dir, uploads_dir, Points, Repo};
use crate::restore::verified::{open_chain, Payloads};
use crate::restore::{RestoreError, StreamInput};
use crate::xen::point::{PointDisk, PointInfo, POINT_FILE};
use std::collections::BTreeSet;
use std::io::Read;
use std::sync::{Arc, Mutex};

/// Steps 1 to 3 for kept point `id`: each incremental disk merged into a new stream of the
/// point's directory, read back and verified; then point.json replaced. Returns the new
/// point.json, the merged streams, and the keys of the streams it no longer names.
pub(super) async fn make_full(
    repo: &Repo,
    vm: &str,
    view: &Points,
    id: &str,
) -> Result<(PointInfo, Vec<MergedStream>, Vec<String>), PruneError> {
    let point = view
        .get(id)
        .ok_or_else(|| PruneError::Internal(format!("point {id} vanished")))?;
    let dir = point_dir(vm, id);
    let mut taken: BTreeSet<String> = point.files.iter().map(|f| f.key.clone()).collect();
    let mut info = point.info.clone();
    let mut merged = Vec::new();
    let mut replaced = Vec::new();
    for disk in info.disks.iter_mut() {
        if disk.base.is_none() {
            continue;
        }
        let chain_err = |reason: String| PruneError::Chain {
            vm: vm.to_owned(),
            reason,
        };
        let inputs = view.disk_chain(vm, id, &disk.id).map_err(chain_err)?;
        let name = new_stream_name(&disk.slot, &dir, &taken).ok_or_else(|| PruneError::Chain {
            vm: vm.to_owned(),
            reason: format!("point {id}: disk slot {:?} cannot name a file", disk.slot),
        })?;
        let key = format!("{dir}/{name}");
        taken.insert(key.clone());
        let (report, stored) = merge_disk(repo, vm, id, disk, &inputs, &key).await?;
        kill_point("merge-stored");
        verify_stored(&repo.store, &key, &stored, disk.size).await?;
        kill_point("verified");
        replaced.push(format!("{dir}/{}", disk.stream));
        merged.push(MergedStream {
            point: id.to_owned(),
            disk: disk.id.clone(),
            stream: name.clone(),
            sha256: stored.sha256.clone(),
            bytes: stored.bytes,
            records_copied: report.copied,
            records_recompressed: report.recompressed,
            zero_records_cut: report.zero_cut,
            records_dropped: report.dropped,
        });
        disk.stream = name;
        disk.sha256 = stored.sha256;
        disk.base = None;
    }
    info.base = None;
    let mut text =
        serde_json::to_vec_pretty(&info).map_err(crate::repo::store::StoreError::from_json)?;
    text.push(b'\n');
    repo.store.put(&format!("{dir}/{POINT_FILE}"), text).await?;
    kill_point("recorded");
    Ok((info, merged, replaced))
}

/// `disk<slot>.full.cbts`, or with a number added when a file has that name.
pub(super) fn new_stream_name(slot: &str, dir: &str, taken: &BTreeSet<String>) -> Option<String> {
    (0..1000u32)
        .map(|n| match n {
            0 => format!("disk{slot}.full.cbts"),
            n => format!("disk{slot}.full{n}.cbts"),
        })
        .find(|name| !taken.contains(&format!("{dir}/{name}")))
        .filter(|name| valid_name(name))
}

/// Merges the streams `inputs` (keys, oldest first) into a new object `key`.
async fn merge_disk(
    repo: &Repo,
    vm: &str,
    point: &str,
    disk: &PointDisk,
    inputs: &[String],
    key: &str,
) -> Result<(MergeReport, Stored), PruneError> {
    let mut readers = Vec::new();
    let mut input_bytes = 0u64;
    for k in inputs {
        let Some(size) = repo.store.size(k).await? else {
            return Err(PruneError::Chain {
                vm: vm.to_owned(),
                reason: format!(
                    "disk {} of point {point} needs {}, which is missing",
                    disk.id,
                    repo.store.describe(k)
                ),
            });
        };
        input_bytes = input_bytes.saturating_add(size);
        let r = ObjectReader::open(&repo.store, k).await?;
        readers.push(StreamInput::Reader {
            name: repo.store.describe(k),
            reader: Box::new(r),
        });
    }
    // About the merged stream's largest size, for S3's part size (which keeps a tenth of
    // the part limit spare): the disk's size, or all the inputs together if more.
    let (upload, writer) = upload::start(
        &repo.store,
        key,
        input_bytes.max(disk.size),
        &uploads_dir(vm),
    )
    .await?;
    let name = repo.store.describe(key);
    let merged = tokio::task::spawn_blocking(move || -> Result<MergeReport, MergeError> {
        let mut out = std::io::BufWriter::with_capacity(1 << 20, writer);
        let report = merge_into(readers, &mut out, &name)?;
        let writer = out.into_inner().map_err(|e| MergeError::Output {
            output: name.clone(),
            error: e.into_error(),
        })?;
        kill_point("merge-written");
        Box::new(writer)
            .finish()
            .map_err(|error| MergeError::Output {
                output: name,
                error,
            })?;
        Ok(report)
    })
    .await
    .map_err(|e| PruneError::Internal(format!("the merge thread failed: {e}")))?;
    let merge_err = |source| PruneError::Merge {
        point: point.to_owned(),
        disk: disk.id.clone(),
        source,
    };
    match merged {
        Ok(report) => Ok((report, upload.finish().await?)),
        Err(e) => {
            // The writer was dropped unfinished: the upload removes what it wrote.
            if let Err(cleanup) = upload.finish().await {
                tracing::debug!("the merged stream's upload ended: {cleanup}");
            }
            Err(merge_err(e))
        }
    }
}

/// Reads the stored object `key` back: a full stream whose records, digest and trailer
/// verify, of a disk of `disk_size` bytes, with the SHA-256 and size the upload reported.
pub(super) async fn verify_stored(
    store: &Store,
    key: &str,
    stored: &Stored,
    disk_size: u64,
) -> Result<(), PruneError> {
    let what = store.describe(key);
    let failed = |reason: String| PruneError::Verify {
        what: what.clone(),
        reason,
    };
    let reader = ObjectReader::open(store, key).await?;
    let hashed = Arc::new(Mutex::new((
        ring::digest::Context::new(&ring::digest::SHA256),
        0u64,
    )));
    let input = StreamInput::Reader {
        name: what.clone(),
        reader: Box::new(Hashing {
            inner: reader,
            hashed: hashed.clone(),
        }),
    };
    let checked = tokio::task::spawn_blocking(move || -> Result<u64, RestoreError> {
        let mut streams = open_chain(vec![input], &|input| {
            Err(RestoreError::ChainMismatch {
                input: input.to_owned(),
                reason: "a merged stream is a full one, and this is an incremental".into(),
            })
        })?;
        let stream = streams
            .pop()
            .ok_or_else(|| RestoreError::Internal("no stream".into()))?;
        let size = stream.header.virtual_size;
        stream.verify(&mut Payloads::new()?, |_| Ok(()))?;
        Ok(size)
    })
    .await
    .map_err(|e| PruneError::Internal(format!("the verifying thread failed: {e}")))?
    .map_err(|e| failed(e.to_string()))?;
    if checked != disk_size {
        return Err(failed(format!(
            "it is of a disk of {checked} bytes, and the point's disk has {disk_size}"
        )));
    }
    let (ctx, bytes) = {
        let guard = hashed
            .lock()
            .map_err(|_| PruneError::Internal("hash lock poisoned".into()))?;
        (guard.0.clone(), guard.1)
    };
    let sha256 = upload::hex(ctx.finish().as_ref());
    if sha256 != stored.sha256 || bytes != stored.bytes {
        return Err(failed(format!(
            "read back {bytes} bytes with SHA-256 {sha256}, but {} bytes with SHA-256 {} were written",
            stored.bytes, stored.sha256
        )));
    }
    Ok(())
}

/// A reader that hashes what passes through it.
struct Hashing<R> {
    inner: R,
    hashed: Arc<Mutex<(ring::digest::Context, u64)>>,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        let mut h = self
            .hashed
            .lock()
            .map_err(|_| std::io::Error::other("hash lock poisoned"))?;
        h.0.update(&buf[..n]);
        h.1 += n as u64;
        Ok(n)
    }
}
