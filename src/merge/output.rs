//! The merged stream's back end: pieces handed over in stream order are compressed and
//! checked on worker threads and written, still in order, by one writer thread.

use super::{output_error, MergeError};
use crate::restore::verified::Payloads;
use bytes::Bytes;
use cbtstream_proto::stream::{checksum, Codec, Encoder, StreamError, TRAILER_LEN};
use std::collections::BTreeMap;
use std::io::Write;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::{Scope, ScopedJoinHandle};

/// Level of the zstd frames written for the pieces of cut records (export's default).
const ZSTD_LEVEL: i32 = 1;
/// Pieces handed over and not yet written, per worker: this bounds the memory they hold
/// (each at most one record), however unevenly the workers progress.
const IN_FLIGHT_PER_WORKER: usize = 3;

/// One thing for the output, in stream order.
pub(super) enum Piece {
    /// A ZERO record.
    Zero { offset: u64, length: u64 },
    /// A DATA record copied as stored.
    Stored {
        offset: u64,
        length: u64,
        codec: Codec,
        checksum: u64,
        payload: Bytes,
    },
    /// The visible bytes of a cut record: ZERO if all zero, else zstd when `compress` and
    /// smaller, else raw.
    Cut {
        offset: u64,
        bytes: Vec<u8>,
        compress: bool,
    },
    /// A record newer ones cover whole: checked, not written.
    Check {
        input: Arc<str>,
        index: u64,
        offset: u64,
        length: u64,
        codec: Codec,
        checksum: u64,
        payload: Bytes,
    },
    /// Every piece was handed over: the trailer follows.
    End,
}

/// A piece ready to be written.
enum Ready {
    Zero {
        offset: u64,
        length: u64,
    },
    Data {
        offset: u64,
        length: u64,
        codec: Codec,
        checksum: u64,
        payload: Bytes,
    },
    Nothing,
    End,
}

type Done = (u64, Result<Ready, MergeError>);

/// What the writer wrote: records and bytes, trailer included.
pub(super) struct Written {
    pub records: u64,
    pub bytes: u64,
}

/// The running back end. Dropping it without [`Pipeline::finish`] stops it.
pub(super) struct Pipeline<'scope> {
    jobs: Option<SyncSender<(u64, Piece)>>,
    /// One credit per piece handed over, returned by the writer when it took the piece.
    credits: SyncSender<()>,
    next: u64,
    workers: Vec<ScopedJoinHandle<'scope, ()>>,
    writer: ScopedJoinHandle<'scope, Result<Option<Written>, MergeError>>,
    /// A send failed: the writer stopped, and its error is the one to report.
    stopped: bool,
}

impl<'scope> Pipeline<'scope> {
    /// Starts the workers and the writer, which first writes `header`.
    pub(super) fn start<'env>(
        scope: &'scope Scope<'scope, 'env>,
        encoder: Encoder,
        header: Vec<u8>,
        out: &'scope mut (dyn Write + Send),
        name: &'scope str,
    ) -> Result<Pipeline<'scope>, MergeError> {
        let count = std::thread::available_parallelism().map_or(2, |n| n.get().min(4));
        let in_flight = count * IN_FLIGHT_PER_WORKER;
        let (credits, credits_rx) = sync_channel::<()>(in_flight);
        let (jobs, job_rx) = sync_channel::<(u64, Piece)>(in_flight);
        let (done_tx, done_rx) = sync_channel::<Done>(in_flight);
        let job_rx = Arc::new(Mutex::new(job_rx));
        let mut workers = Vec::with_capacity(count);
        for _ in 0..count {
            let compressor = zstd::bulk::Compressor::new(ZSTD_LEVEL).map_err(|e| {
                MergeError::Internal(format!("cannot create a zstd compressor: {e}"))
            })?;
            let payloads = Payloads::new()?;
            let (rx, tx) = (job_rx.clone(), done_tx.clone());
            workers.push(scope.spawn(move || worker(rx, tx, compressor, payloads)));
        }
        drop(done_tx);
        let writer = scope.spawn(move || writer(done_rx, credits_rx, encoder, header, out, name));
        Ok(Pipeline {
            jobs: Some(jobs),
            credits,
            next: 0,
            workers,
            writer,
            stopped: false,
        })
    }

    pub(super) fn send(&mut self, piece: Piece) -> Result<(), MergeError> {
        let sent = self.credits.send(()).is_ok()
            && self
                .jobs
                .as_ref()
                .is_some_and(|jobs| jobs.send((self.next, piece)).is_ok());
        if !sent {
            self.stopped = true;
            return Err(MergeError::Internal("the output stopped".into()));
        }
        self.next += 1;
        Ok(())
    }

    /// After a successful `sweep` (handing every piece over), waits for them and the trailer
    /// to be written. Otherwise stops the output without a trailer and returns the sweep's
    /// error, unless that only says the output stopped: then the output's own error.
    pub(super) fn finish(mut self, sweep: Result<(), MergeError>) -> Result<Written, MergeError> {
        let sweep = sweep.and_then(|()| self.send(Piece::End));
        drop(self.jobs.take());
        for w in self.workers {
            if let Err(panic) = w.join() {
                std::panic::resume_unwind(panic);
            }
        }
        let written = match self.writer.join() {
            Ok(w) => w,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        match (sweep, written) {
            (Err(_), Err(w)) if self.stopped => Err(w),
            (Err(e), _) => Err(e),
            (Ok(()), Ok(Some(w))) => Ok(w),
            (Ok(()), Ok(None)) => Err(MergeError::Internal("the output ended early".into())),
            (Ok(()), Err(w)) => Err(w),
        }
    }
}

fn worker(
    jobs: Arc<Mutex<Receiver<(u64, Piece)>>>,
    done: SyncSender<Done>,
    mut compressor: zstd::bulk::Compressor<'static>,
    mut payloads: Payloads,
) {
    loop {
        let next = match jobs.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok((seq, piece)) = next else { return };
        let ready = prepare(piece, &mut compressor, &mut payloads);
        if done.send((seq, ready)).is_err() {
            return;
        }
    }
}

fn prepare(
    piece: Piece,
    compressor: &mut zstd::bulk::Compressor<'static>,
    payloads: &mut Payloads,
) -> Result<Ready, MergeError> {
    Ok(match piece {
        Piece::End => Ready::End,
        Piece::Zero { offset, length } => Ready::Zero { offset, length },
        Piece::Stored {
            offset,
            length,
            codec,
            checksum,
            payload,
        } => Ready::Data {
            offset,
            length,
            codec,
            checksum,
            payload,
        },
        Piece::Check {
            input,
            index,
            offset,
            length,
            codec,
            checksum,
            payload,
        } => {
            payloads.decode(&input, index, offset, length, codec, checksum, &payload)?;
            Ready::Nothing
        }
        Piece::Cut {
            offset,
            bytes,
            compress,
        } => {
            let length = bytes.len() as u64;
            if crate::engine::encode::is_zero(&bytes) {
                return Ok(Ready::Zero { offset, length });
            }
            let checksum = checksum(&bytes);
            if compress {
                let frame = compressor
                    .compress(&bytes)
                    .map_err(|e| MergeError::Internal(format!("zstd compression failed: {e}")))?;
                if frame.len() < bytes.len() {
                    return Ok(Ready::Data {
                        offset,
                        length,
                        codec: Codec::Zstd,
                        checksum,
                        payload: frame.into(),
                    });
                }
            }
            Ready::Data {
                offset,
                length,
                codec: Codec::None,
                checksum,
                payload: bytes.into(),
            }
        }
    })
}

fn encoded<T>(r: Result<T, StreamError>) -> Result<T, MergeError> {
    r.map_err(|e| MergeError::Internal(format!("the merged stream was refused: {e}")))
}

/// Writes the header, then the pieces in order as they become ready, then the trailer at
/// [`Piece::End`]. `None` when the pieces stopped before the end.
fn writer(
    done: Receiver<Done>,
    credits: Receiver<()>,
    mut encoder: Encoder,
    header: Vec<u8>,
    out: &mut (dyn Write + Send),
    name: &str,
) -> Result<Option<Written>, MergeError> {
    let write = |out: &mut (dyn Write + Send), parts: &[&[u8]]| -> Result<(), MergeError> {
        for p in parts {
            out.write_all(p).map_err(|e| output_error(name, e))?;
        }
        Ok(())
    };
    write(out, &[&header])?;
    let mut waiting: BTreeMap<u64, Ready> = BTreeMap::new();
    let mut next = 0u64;
    for (seq, ready) in done.iter() {
        waiting.insert(seq, ready?);
        while let Some(ready) = waiting.remove(&next) {
            next += 1;
            // The credit was given before the piece was handed over: this does not wait.
            let _ = credits.recv();
            match ready {
                Ready::End => {
                    let written = Written {
                        records: encoder.records(),
                        bytes: encoder.bytes_written() + TRAILER_LEN as u64,
                    };
                    write(out, &[&encoder.finish()])?;
                    return Ok(Some(written));
                }
                Ready::Nothing => {}
                Ready::Zero { offset, length } => {
                    let h = encoded(encoder.zero(offset, length))?;
                    write(out, &[&h])?;
                }
                Ready::Data {
                    offset,
                    length,
                    codec,
                    checksum,
                    payload,
                } => {
                    let h = encoded(encoder.data(offset, length, codec, checksum, &payload))?;
                    write(out, &[&h, &payload])?;
                }
            }
        }
    }
    Ok(None)
}
