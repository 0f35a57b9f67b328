//! `restore --xapi`: a chain of streams written into a VDI of the pool through
//! `PUT /import_raw_vdi` (vhd-tool's chunked framing), without a local image.
//!
//! ```text
//! login → the target (a new VDI of --sr, or --vdi: not in use, at the base point)
//!       → read every header, check the chain → VDI.create / mark the VDI `applying`
//!       → one PUT: each stream's verified DATA records as chunks (ZERO records as zeroes,
//!         except in the first, full stream of a new VDI, which is zero already)
//!       → end marker only after every stream verified → task succeeded
//!       → mark the VDI `complete` at the last point
//! ```
//!
//! The VDI's other_config says which point it holds, as a sidecar does for an image: keys
//! [`STATE_KEY`] (`applying` / `complete`), [`POINT_KEY`] and [`SOURCE_KEY`]. A failure or a
//! signal before the end destroys a VDI this run created, and leaves an existing one marked
//! `applying`, so it never looks complete.

use super::{login, retry_in_use, src, XapiLogin};
use crate::engine::Progress;
use crate::exit::{fail, Code, Failure};
use crate::export::shutdown_signal;
use crate::repo::restore::InputSpec;
use crate::restore::verified::{open_chain, Block, OpenStream, Payloads, Verified};
use crate::restore::RestoreError;
use crate::xapi::import::RawUpload;
use crate::xapi::{Ref, XapiSession};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::{mpsc, oneshot};

/// other_config key: `applying` while a restore writes the VDI, `complete` once it holds
/// [`POINT_KEY`] entirely.
pub const STATE_KEY: &str = "cbtstream_restore_state";
/// other_config key: the point the VDI holds (or is being brought to, while `applying`).
pub const POINT_KEY: &str = "cbtstream_point";
/// other_config key: the source id of that point's streams.
pub const SOURCE_KEY: &str = "cbtstream_source";
pub(super) const APPLYING: &str = "applying";
pub(super) const COMPLETE: &str = "complete";

/// Verified blocks waiting to be sent (each at most one record, 32 MiB).
const QUEUE_DEPTH: usize = 4;

/// Where the streams go.
#[derive(Debug, Clone)]
pub enum Target {
    /// A new VDI in the SR with this uuid.
    NewIn { sr: String },
    /// The existing VDI with this uuid.
    Existing { vdi: String },
    /// Roll the VDI with this uuid back to the streams' point, writing only the blocks that
    /// changed since it (the VDI still has the point's CBT metadata on the host).
    Rollback { vdi: String },
}

#[derive(Debug, Clone)]
pub struct PoolRestoreOptions {
    pub login: XapiLogin,
    pub target: Target,
    /// The chain, oldest first: files or objects of a repository.
    pub streams: Vec<InputSpec>,
}

/// What a pool restore did.
#[derive(Debug, Clone, Default)]
pub struct PoolRestoreReport {
    /// The uuid of the VDI that now holds the point.
    pub vdi: String,
    pub point_id: String,
    pub streams: u64,
    pub records: u64,
    pub data_records: u64,
    pub zero_records: u64,
    /// Chunk data sent to the host (zero-filled chunks included).
    pub bytes_sent: u64,
    /// Stream bytes read.
    pub input_bytes: u64,
    pub seconds: f64,
}

impl PoolRestoreReport {
    pub fn json_value(&self) -> serde_json::Value {
        let mbps = if self.seconds > 0.0 {
            self.bytes_sent as f64 / self.seconds / 1e6
        } else {
            0.0
        };
        serde_json::json!({
            "vdi": self.vdi,
            "point": self.point_id,
            "streams": self.streams,
            "records": self.records,
            "data_records": self.data_records,
            "zero_records": self.zero_records,
            "bytes_sent": self.bytes_sent,
            "bytes_read": self.input_bytes,
            "seconds": (self.seconds * 1000.0).round() / 1000.0,
            "mb_per_s": (mbps * 10.0).round() / 10.0,
        })
    }
}

pub async fn run(
    opts: PoolRestoreOptions,
    progress: Arc<dyn Progress>,
) -> Result<PoolRestoreReport, Failure> {
    let started = Instant::now();
    let session = login(&opts.login).await?;
    // A VDI this run created and that does not hold its point yet: removed on any failure.
    let created: Arc<Mutex<Option<Ref>>> = Arc::default();
    let result = tokio::select! {
        r = restore(&session, &opts, &created, progress.as_ref()) => r,
        sig = shutdown_signal() => Err(fail(Code::Interrupted, interrupted(sig, &opts.target))),
    };
    progress.finish();
    let leftover = created.lock().ok().and_then(|mut g| g.take());
    if let Some(vdi) = leftover {
        match retry_in_use(|| session.vdi_destroy(&vdi)).await {
            Ok(()) => tracing::info!("destroyed the VDI this restore had created"),
            Err(e) => tracing::warn!("could not destroy the half-written VDI {vdi}: {e}"),
        }
    }
    session.logout().await;
    result.map(|mut report| {
        report.seconds = started.elapsed().as_secs_f64();
        report
    })
}

fn interrupted(sig: &str, target: &Target) -> String {
    match target {
        Target::NewIn { .. } => {
            format!("interrupted by {sig}; the new VDI (if it was created) is destroyed")
        }
        Target::Existing { vdi } | Target::Rollback { vdi } => format!(
            "interrupted by {sig}; VDI {vdi} is left marked `{APPLYING}` (half-written): \
             restore a full stream into it"
        ),
    }
}

/// Everything up to the `complete` mark.
pub(super) async fn restore(
    session: &XapiSession,
    opts: &PoolRestoreOptions,
    created: &Mutex<Option<Ref>>,
    progress: &dyn Progress,
) -> Result<PoolRestoreReport, Failure> {
    let existing = match &opts.target {
        Target::Existing { vdi } => Some(existing_vdi(session, vdi).await?),
        Target::NewIn { .. } => None,
        Target::Rollback { vdi } => {
            return super::rollback::rollback(session, vdi, &opts.streams, progress).await
        }
    };
    let start = existing.as_ref().map(|e| e.start.clone());
    let vdi_label = match &opts.target {
        Target::Existing { vdi } | Target::Rollback { vdi } => format!("VDI {vdi}"),
        Target::NewIn { .. } => String::new(),
    };
    let (inputs, input_bytes) = InputSpec::open_all(&opts.streams).await?;
    let streams = off_runtime(move || {
        open_chain(inputs, &|input| match &start {
            Some(Ok(s)) => Ok(s.clone()),
            Some(Err(reason)) => Err(RestoreError::ChainMismatch {
                input: input.to_owned(),
                reason: format!("{vdi_label} {reason}"),
            }),
            None => Err(RestoreError::Usage(format!(
                "{input} is an incremental stream: give --vdi with the VDI that holds its base \
                 point (or start the chain with a full stream)"
            ))),
        })
    })
    .await?
    .map_err(restore_failure)?;
    let last = &streams[streams.len() - 1].header;
    let (size, point, source) = (
        last.virtual_size,
        last.point_id.clone(),
        last.source_id.clone(),
    );
    check_sizes(&streams)?;

    let (vdi, uuid, fresh) = match (&opts.target, existing) {
        (Target::NewIn { sr }, _) => {
            let sr_ref = session.sr_get_by_uuid(sr).await.map_err(src)?;
            let name = match source.as_str() {
                "" => format!("cbtstream restore at {point}"),
                s => format!("cbtstream restore of {s} at {point}"),
            };
            let other_config = BTreeMap::from([
                (STATE_KEY.to_owned(), APPLYING.to_owned()),
                (POINT_KEY.to_owned(), point.clone()),
                (SOURCE_KEY.to_owned(), source.clone()),
            ]);
            let vdi = session
                .vdi_create(&sr_ref, size, &name, other_config)
                .await
                .map_err(src)?;
            if let Ok(mut g) = created.lock() {
                *g = Some(vdi.clone());
            }
            let uuid = session.vdi_get_uuid(&vdi).await.map_err(src)?;
            (vdi, uuid, true)
        }
        (Target::Existing { vdi: uuid }, Some(e)) => {
            if e.size < size {
                session.vdi_resize(&e.vdi, size).await.map_err(src)?;
            } else if e.size > size && streams[0].header.is_full() {
                return Err(fail(
                    Code::Usage,
                    format!(
                        "VDI {uuid} is {} bytes, larger than the restored disk ({size} bytes): \
                         shrinking is not supported; restore into a new VDI with --sr",
                        e.size
                    ),
                ));
            }
            // `applying` first: from here on the VDI never looks complete until it is.
            session
                .vdi_set_other_config_key(&e.vdi, STATE_KEY, APPLYING)
                .await
                .map_err(src)?;
            session
                .vdi_set_other_config_key(&e.vdi, POINT_KEY, &point)
                .await
                .map_err(src)?;
            session
                .vdi_set_other_config_key(&e.vdi, SOURCE_KEY, &source)
                .await
                .map_err(src)?;
            (e.vdi, uuid.clone(), false)
        }
        (Target::Rollback { .. }, _) | (Target::Existing { .. }, None) => {
            return Err(fail(
                Code::Failure,
                "internal error: the VDI was not looked up",
            ))
        }
    };

    let mut report = PoolRestoreReport {
        vdi: uuid,
        point_id: point.clone(),
        ..PoolRestoreReport::default()
    };
    progress.start(input_bytes);
    let upload = session.import_raw_chunked(&vdi).await.map_err(src)?;
    send_chain(session, upload, streams, fresh, None, progress, &mut report).await?;

    // The host holds the point: record it, `complete` last.
    session
        .vdi_set_other_config_key(&vdi, STATE_KEY, COMPLETE)
        .await
        .map_err(src)?;
    if let Ok(mut g) = created.lock() {
        *g = None;
    }
    tracing::info!(vdi = %report.vdi, point = %point, "restored into the pool");
    Ok(report)
}

/// An existing VDI, checked: not in use by a running VM, and where its chain stands.
pub(super) struct ExistingVdi {
    pub vdi: Ref,
    pub size: u64,
    /// (point, source, name) when it holds a point completely, else why it does not.
    start: Result<(String, String, String), String>,
}

pub(super) async fn existing_vdi(
    session: &XapiSession,
    uuid: &str,
) -> Result<ExistingVdi, Failure> {
    let vdi = session.vdi_get_by_uuid(uuid).await.map_err(src)?;
    for vbd in session.vdi_get_vbds(&vdi).await.map_err(src)? {
        if !session
            .vbd_get_currently_attached(&vbd)
            .await
            .map_err(src)?
        {
            continue;
        }
        let vm = session.vbd_get_vm(&vbd).await.map_err(src)?;
        if session.vm_get_power_state(&vm).await.map_err(src)? == "Running" {
            let vm_uuid = session.vm_get_uuid(&vm).await.map_err(src)?;
            return Err(fail(
                Code::Source,
                format!(
                    "VDI {uuid} is attached to the running VM {vm_uuid}: shut the VM down (or \
                     unplug the disk) before restoring into it; nothing was written"
                ),
            ));
        }
    }
    let record = session.vdi_get_record(&vdi).await.map_err(src)?;
    let oc = &record.other_config;
    let start = match (
        oc.get(STATE_KEY).map(String::as_str),
        oc.get(POINT_KEY),
        oc.get(SOURCE_KEY),
    ) {
        (Some(COMPLETE), Some(point), Some(source)) => {
            Ok((point.clone(), source.clone(), format!("VDI {uuid}")))
        }
        (Some(APPLYING), Some(point), _) => Err(format!(
            "is half-written: a restore to point `{point}` started and did not finish; \
             restore again starting from a full stream"
        )),
        _ => Err(format!(
            "has no record of a cbtstream restore ({STATE_KEY} and {POINT_KEY} in its \
             other_config), so which point it holds is unknown; restore a full stream first"
        )),
    };
    Ok(ExistingVdi {
        vdi,
        size: record.virtual_size,
        start,
    })
}

/// Sizes import_raw_vdi can write: whole sectors, and a disk that never shrinks along the
/// chain (a VDI cannot be shrunk).
pub(super) fn check_sizes(streams: &[OpenStream]) -> Result<(), Failure> {
    let mut previous = 0;
    for s in streams {
        let size = s.header.virtual_size;
        if !size.is_multiple_of(512) {
            return Err(fail(
                Code::Usage,
                format!(
                    "{}: the disk size {size} is not a whole number of 512-byte sectors, which \
                     a VDI needs",
                    s.name()
                ),
            ));
        }
        if size < previous && !s.header.is_full() {
            return Err(fail(
                Code::Usage,
                format!(
                    "{}: the disk shrinks from {previous} to {size} bytes along the chain, \
                     which a VDI cannot do",
                    s.name()
                ),
            ));
        }
        previous = size;
    }
    Ok(())
}

/// For a rollback: the 64 KiB blocks to write (changed since the point), those a newer
/// stream already supplied, and those the stream being read supplies.
pub(super) struct Wanted {
    changed: Vec<u8>,
    /// Supplied by the streams read so far (newer than the current one).
    written: Vec<u8>,
    /// Supplied by the current stream: merged into `written` at its end, because records of
    /// one stream need not follow 64 KiB blocks (a block may come in several records).
    this: Vec<u8>,
    size: u64,
}

const BLOCK: u64 = cbtstream_proto::cbt::CBT_BLOCK;

impl Wanted {
    /// `changed`: a CBT bitmap (most significant bit first) of a disk of `size` bytes.
    pub(super) fn new(changed: Vec<u8>, size: u64) -> Wanted {
        let written = vec![0; changed.len()];
        let this = written.clone();
        Wanted {
            changed,
            written,
            this,
            size,
        }
    }

    fn bit(map: &[u8], block: u64) -> bool {
        map.get((block / 8) as usize)
            .is_some_and(|b| b & (0x80 >> (block % 8)) != 0)
    }

    fn set(map: &mut [u8], block: u64) {
        if let Some(b) = map.get_mut((block / 8) as usize) {
            *b |= 0x80 >> (block % 8);
        }
    }

    /// Hands `emit` the ranges of `[offset, offset + len)` in blocks that changed and no
    /// newer stream supplied, merged, in order.
    fn take<E>(
        &mut self,
        offset: u64,
        len: u64,
        mut emit: impl FnMut(u64, u64) -> Result<(), E>,
    ) -> Result<(), E> {
        let end = offset.saturating_add(len).min(self.size);
        let mut run: Option<(u64, u64)> = None;
        let mut pos = offset;
        while pos < end {
            let block = pos / BLOCK;
            let next = ((block + 1) * BLOCK).min(end);
            if Self::bit(&self.changed, block) && !Self::bit(&self.written, block) {
                Self::set(&mut self.this, block);
                run = match run {
                    Some((o, l)) if o + l == pos => Some((o, l + next - pos)),
                    Some((o, l)) => {
                        emit(o, l)?;
                        Some((pos, next - pos))
                    }
                    None => Some((pos, next - pos)),
                };
            }
            pos = next;
        }
        match run {
            Some((o, l)) => emit(o, l),
            None => Ok(()),
        }
    }

    /// The current stream is over: what it supplied is no older stream's to supply.
    fn end_stream(&mut self) {
        for (w, t) in self.written.iter_mut().zip(self.this.iter_mut()) {
            *w |= *t;
            *t = 0;
        }
    }

    /// After every stream: changed blocks none of them holds (where the disk grew after
    /// they were written) are zero at the point. Hands them to `emit`, merged.
    fn rest<E>(&mut self, mut emit: impl FnMut(u64, u64) -> Result<(), E>) -> Result<(), E> {
        let blocks = self.size.div_ceil(BLOCK);
        let mut run: Option<(u64, u64)> = None;
        for block in 0..blocks {
            if !Self::bit(&self.changed, block) || Self::bit(&self.written, block) {
                continue;
            }
            let (pos, next) = (block * BLOCK, ((block + 1) * BLOCK).min(self.size));
            run = match run {
                Some((o, l)) if o + l == pos => Some((o, l + next - pos)),
                Some((o, l)) => {
                    emit(o, l)?;
                    Some((pos, next - pos))
                }
                None => Some((pos, next - pos)),
            };
        }
        match run {
            Some((o, l)) => emit(o, l),
            None => Ok(()),
        }
    }
}

/// What the stream reader hands to the upload.
enum Piece {
    Data {
        offset: u64,
        data: Vec<u8>,
        stored: u64,
    },
    Zero {
        offset: u64,
        length: u64,
    },
    Verified(Verified),
    Failed(RestoreError),
}

/// Sends every stream's blocks; the end marker only once all of them verified.
pub(super) async fn send_chain(
    session: &XapiSession,
    mut upload: RawUpload,
    streams: Vec<OpenStream>,
    fresh: bool,
    wanted: Option<Wanted>,
    progress: &dyn Progress,
    report: &mut PoolRestoreReport,
) -> Result<(), Failure> {
    let count = streams.len() as u64;
    let (tx, mut rx) = mpsc::channel(QUEUE_DEPTH);
    // A thread of its own, not the runtime's blocking pool: a reader stuck on a pipe must
    // not keep the process alive after a signal.
    std::thread::spawn(move || read_chain(streams, fresh, wanted, tx));
    while let Some(piece) = rx.recv().await {
        let sent = match piece {
            Piece::Data {
                offset,
                data,
                stored,
            } => {
                progress.advance(stored);
                upload.chunk(offset, &data).await
            }
            Piece::Zero { offset, length } => upload.zeros(offset, length).await,
            Piece::Verified(v) => {
                report.streams += 1;
                report.records += v.trailer.records;
                report.data_records += v.data_records;
                report.zero_records += v.zero_records;
                report.input_bytes += v.input_bytes;
                Ok(())
            }
            // Dropping the upload closes the connection without the end marker.
            Piece::Failed(e) => return Err(restore_failure(e)),
        };
        if let Err(e) = sent {
            return Err(src(upload.explain(session, e).await));
        }
    }
    if report.streams != count {
        return Err(fail(
            Code::Failure,
            "the stream reader stopped unexpectedly",
        ));
    }
    report.bytes_sent = upload.sent;
    upload.finish(session).await.map_err(src)
}

/// Reads and verifies the streams in order (on its own thread).
fn read_chain(
    streams: Vec<OpenStream>,
    fresh: bool,
    mut wanted: Option<Wanted>,
    tx: mpsc::Sender<Piece>,
) {
    let mut payloads = match Payloads::new() {
        Ok(p) => p,
        Err(e) => {
            let _ = tx.blocking_send(Piece::Failed(e));
            return;
        }
    };
    let stopped = || RestoreError::Internal("the upload stopped".into());
    for (i, stream) in streams.into_iter().enumerate() {
        // The first stream into a new VDI is full (the chain check says so) and the VDI
        // reads as zeroes already.
        let skip_zeros = fresh && i == 0;
        let verified = stream.verify(&mut payloads, |block| {
            let send = |piece| tx.blocking_send(piece).map_err(|_| stopped());
            match (block, wanted.as_mut()) {
                (Block::Zero { .. }, None) if skip_zeros => Ok(()),
                (
                    Block::Data {
                        offset,
                        data,
                        stored,
                    },
                    None,
                ) => send(Piece::Data {
                    offset,
                    data: data.to_vec(),
                    stored,
                }),
                (Block::Zero { offset, length }, None) => send(Piece::Zero { offset, length }),
                // A rollback: only the blocks changed since the point, each from the newest
                // stream that holds it (the streams come newest first).
                (Block::Data { offset, data, .. }, Some(w)) => {
                    w.take(offset, data.len() as u64, |o, l| {
                        let at = (o - offset) as usize;
                        send(Piece::Data {
                            offset: o,
                            data: data[at..at + l as usize].to_vec(),
                            stored: l,
                        })
                    })
                }
                (Block::Zero { offset, length }, Some(w)) => w.take(offset, length, |o, l| {
                    send(Piece::Zero {
                        offset: o,
                        length: l,
                    })
                }),
            }
        });
        if let (Ok(_), Some(w)) = (&verified, wanted.as_mut()) {
            w.end_stream();
        }
        let piece = match verified {
            Ok(v) => Piece::Verified(v),
            Err(e) => Piece::Failed(e),
        };
        let failed = matches!(piece, Piece::Failed(_));
        if tx.blocking_send(piece).is_err() || failed {
            return;
        }
    }
    if let Some(w) = wanted.as_mut() {
        let _ = w.rest(|offset, length| {
            tx.blocking_send(Piece::Zero { offset, length })
                .map_err(|_| stopped())
        });
    }
}

pub(super) fn restore_failure(e: RestoreError) -> Failure {
    Failure {
        code: e.exit_code(),
        error: e.into(),
    }
}

/// Runs blocking work (reading stream headers, maybe from a pipe) on a thread of its own.
pub(super) async fn off_runtime<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Failure> {
    let (tx, rx) = oneshot::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.await
        .map_err(|_| fail(Code::Failure, "reading the stream headers failed"))
}

#[cfg(test)]
mod wanted_tests {
    use super::*;

    fn ranges(w: &mut Wanted, offset: u64, len: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        w.take(offset, len, |o, l| {
            out.push((o, l));
            Ok::<_, ()>(())
        })
        .unwrap();
        out
    }

    /// A changed block that one stream supplies in two records (a ZERO record of its first
    /// 4 KiB, then data) is written whole; an older stream then supplies nothing of it.
    #[test]
    fn a_block_in_several_records_of_one_stream() {
        // Blocks 0 and 2 changed, of a disk of 3 blocks.
        let mut w = Wanted::new(vec![0b1010_0000], 3 * BLOCK);
        assert_eq!(ranges(&mut w, 0, 4096), [(0, 4096)]);
        assert_eq!(ranges(&mut w, 4096, BLOCK - 4096), [(4096, BLOCK - 4096)]);
        w.end_stream();
        // The older (full) stream: only block 2 is still wanted.
        assert_eq!(ranges(&mut w, 0, 3 * BLOCK), [(2 * BLOCK, BLOCK)]);
        w.end_stream();
        let mut rest = Vec::new();
        w.rest(|o, l| {
            rest.push((o, l));
            Ok::<_, ()>(())
        })
        .unwrap();
        assert!(rest.is_empty());
    }

    /// Changed blocks no stream holds (the disk grew after the streams) are zero at the point.
    #[test]
    fn changed_blocks_no_stream_holds_are_zeroed() {
        // A disk of 4 blocks, the last one partial; blocks 1, 2 and 3 changed; the streams
        // cover blocks 0 and 1 only.
        let size = 3 * BLOCK + 512;
        let mut w = Wanted::new(vec![0b0111_0000], size);
        assert_eq!(ranges(&mut w, 0, 2 * BLOCK), [(BLOCK, BLOCK)]);
        w.end_stream();
        let mut rest = Vec::new();
        w.rest(|o, l| {
            rest.push((o, l));
            Ok::<_, ()>(())
        })
        .unwrap();
        assert_eq!(rest, [(2 * BLOCK, BLOCK + 512)]);
    }
}
