//! Streams written into a repository as they are produced, from the engine's sink thread:
//! to a file (local) or as an S3 multipart upload, hashed (SHA-256) on the way.
//!
//! On S3, each upload is recorded in a journal object under the VM's `uploads/` before its
//! first part and removed once it is completed or aborted; an upload cut off with the server
//! (so that it could not even be aborted) is aborted by the next run that holds the VM's
//! lock ([`abort_journaled`]): no parts are left behind.

use super::store::{create_parents, Store, StoreError};
use crate::engine::sink::FinishingWriter;
use bytes::Bytes;
use object_store::multipart::{MultipartStore, PartId};
use std::io::Write;
use std::sync::Arc;

/// Parts smaller than this are refused by S3 (all but the last); 8 MiB is the usual size.
const MIN_PART: u64 = 8 << 20;
/// S3 allows 10,000 parts; the part size keeps well below.
const MAX_PARTS: u64 = 9_000;
/// S3's largest part.
const MAX_PART: u64 = 5 << 30;
/// Parts uploaded at once per stream (each holds one part in memory).
const PARTS_IN_FLIGHT: usize = 2;
/// A journal entry is a few hundred bytes.
const JOURNAL_LIMIT: u64 = 64 << 10;

/// The part size for a stream of about `expected` bytes (an upper bound, such as the disk's
/// size): large enough that the stream fits in 10,000 parts.
pub fn part_size(expected: u64) -> u64 {
    let needed = expected.div_ceil(MAX_PARTS).next_multiple_of(1 << 20);
    needed.clamp(MIN_PART, MAX_PART)
}

/// What was stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub sha256: String,
    pub bytes: u64,
}

enum Msg {
    Part(Bytes),
    End(Stored),
}

/// The async half of an upload: [`Upload::finish`] says whether it was stored.
pub struct Upload {
    key: String,
    task: tokio::task::JoinHandle<Result<Stored, StoreError>>,
}

impl Upload {
    /// Waits for the upload: `Ok` once the object is whole and durable. When the writer
    /// was dropped before the stream ended, the upload is aborted (and this says so).
    pub async fn finish(self) -> Result<Stored, StoreError> {
        self.task.await.map_err(|e| StoreError::Io {
            what: self.key.clone(),
            source: std::io::Error::other(e),
        })?
    }
}

/// The writing half, for the engine's sink (a blocking thread).
pub struct ObjectWriter {
    out: Out,
    hash: ring::digest::Context,
    bytes: u64,
    tx: async_channel::Sender<Msg>,
}

enum Out {
    File(std::fs::File),
    Parts { buf: Vec<u8>, part: usize },
}

impl Write for ObjectWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = match &mut self.out {
            Out::File(f) => f.write(data)?,
            Out::Parts { buf, part } => {
                let n = data.len().min(*part - buf.len());
                buf.extend_from_slice(&data[..n]);
                if buf.len() == *part {
                    let full = std::mem::replace(buf, Vec::with_capacity(*part));
                    send(&self.tx, Msg::Part(Bytes::from(full)))?;
                }
                n
            }
        };
        self.hash.update(&data[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    /// Files take the sink's vectored writes whole (record header and payload in one call).
    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        let Out::File(f) = &mut self.out else {
            let first = bufs
                .iter()
                .find(|b| !b.is_empty())
                .map_or(&[][..], |b| &b[..]);
            return self.write(first);
        };
        let n = f.write_vectored(bufs)?;
        let mut left = n;
        for b in bufs {
            let take = left.min(b.len());
            self.hash.update(&b[..take]);
            left -= take;
            if left == 0 {
                break;
            }
        }
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn send(tx: &async_channel::Sender<Msg>, msg: Msg) -> std::io::Result<()> {
    tx.send_blocking(msg).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::BrokenPipe,
            "the upload to the repository failed",
        )
    })
}

impl FinishingWriter for ObjectWriter {
    fn finish(self: Box<Self>) -> std::io::Result<()> {
        let ObjectWriter {
            out,
            hash,
            bytes,
            tx,
        } = *self;
        match out {
            Out::File(f) => f.sync_all()?,
            Out::Parts { buf, .. } if !buf.is_empty() => send(&tx, Msg::Part(Bytes::from(buf)))?,
            Out::Parts { .. } => {}
        }
        let sha256 = hex(hash.finish().as_ref());
        send(&tx, Msg::End(Stored { sha256, bytes }))
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Starts writing object `key`, expected to be at most about `expected_size` bytes.
/// `journal` is where an S3 upload is recorded while it is open (a directory key).
pub async fn start(
    store: &Store,
    key: &str,
    expected_size: u64,
    journal: &str,
) -> Result<(Upload, ObjectWriter), StoreError> {
    let (tx, rx) = async_channel::bounded(1);
    let hash = ring::digest::Context::new(&ring::digest::SHA256);
    let describe = store.describe(key);
    let (out, task) = match store {
        Store::Local(root) => {
            let path = root.join(key);
            let _ = Store::s3_path("", key)?; // the same key rules as everywhere
            let p = path.clone();
            let file = tokio::task::spawn_blocking(move || {
                create_parents(&p)?;
                // (private_options: write, create, mode 0600.)
                crate::durable::private_options().truncate(true).open(&p)
            })
            .await
            .map_err(|e| StoreError::Io {
                what: describe.clone(),
                source: std::io::Error::other(e),
            })?
            .map_err(|source| StoreError::Io {
                what: describe.clone(),
                source,
            })?;
            let task = tokio::spawn(local_task(path, describe, rx));
            (Out::File(file), task)
        }
        Store::S3 {
            store: s3, prefix, ..
        } => {
            let path = Store::s3_path(prefix, key)?;
            let s3_err = |source| StoreError::S3 {
                what: describe.clone(),
                source,
            };
            let id = s3.create_multipart(&path).await.map_err(s3_err)?;
            let entry = format!("{journal}/{}.json", uuid::Uuid::new_v4());
            let record = serde_json::json!({ "key": key, "upload_id": id });
            if let Err(e) = store.put(&entry, record.to_string().into_bytes()).await {
                let _ = s3.abort_multipart(&path, &id).await;
                return Err(e);
            }
            let part = part_size(expected_size) as usize;
            let upload = S3Upload {
                s3: s3.clone(),
                path,
                id,
                describe,
            };
            let task = tokio::spawn(upload.run(rx, store.clone(), entry));
            (
                Out::Parts {
                    buf: Vec::with_capacity(part),
                    part,
                },
                task,
            )
        }
    };
    Ok((
        Upload {
            key: key.to_owned(),
            task,
        },
        ObjectWriter {
            out,
            hash,
            bytes: 0,
            tx,
        },
    ))
}

async fn local_task(
    path: std::path::PathBuf,
    describe: String,
    rx: async_channel::Receiver<Msg>,
) -> Result<Stored, StoreError> {
    let ended = loop {
        match rx.recv().await {
            Ok(Msg::End(stored)) => break Some(stored),
            Ok(Msg::Part(_)) => {}
            Err(_) => break None,
        }
    };
    match ended {
        Some(stored) => {
            crate::durable::sync_parent_dir(&path).map_err(|source| StoreError::Io {
                what: describe,
                source,
            })?;
            Ok(stored)
        }
        None => {
            let _ = std::fs::remove_file(&path);
            Err(cut_off(describe))
        }
    }
}

fn cut_off(describe: String) -> StoreError {
    StoreError::invalid(
        describe,
        "the stream ended before it was complete; nothing was kept",
    )
}

struct S3Upload {
    s3: Arc<object_store::aws::AmazonS3>,
    path: object_store::path::Path,
    id: String,
    describe: String,
}

impl S3Upload {
    async fn run(
        self,
        rx: async_channel::Receiver<Msg>,
        store: Store,
        journal_entry: String,
    ) -> Result<Stored, StoreError> {
        let outcome = self.send_parts(rx).await;
        let settled = match &outcome {
            Ok(_) => true,
            Err(_) => match self.s3.abort_multipart(&self.path, &self.id).await {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(
                        "could not abort the upload of {} ({e}): the next backup or prune aborts it",
                        self.describe
                    );
                    false
                }
            },
        };
        if settled {
            if let Err(e) = store.delete(&journal_entry).await {
                tracing::warn!("could not remove the upload journal entry: {e}");
            }
        }
        outcome
    }

    async fn send_parts(&self, rx: async_channel::Receiver<Msg>) -> Result<Stored, StoreError> {
        let s3_err = |source| StoreError::S3 {
            what: self.describe.clone(),
            source,
        };
        let mut parts: Vec<Option<PartId>> = Vec::new();
        let mut in_flight = tokio::task::JoinSet::new();
        let stored = loop {
            let msg = match rx.recv().await {
                Ok(m) => m,
                Err(_) => return Err(cut_off(self.describe.clone())),
            };
            match msg {
                Msg::Part(data) => {
                    while in_flight.len() >= PARTS_IN_FLIGHT {
                        collect(&mut in_flight, &mut parts).await.map_err(s3_err)?;
                    }
                    let (s3, path, id, idx) = (
                        self.s3.clone(),
                        self.path.clone(),
                        self.id.clone(),
                        parts.len(),
                    );
                    parts.push(None);
                    in_flight.spawn(async move {
                        let r = s3.put_part(&path, &id, idx, data.into()).await;
                        (idx, r)
                    });
                }
                Msg::End(stored) => break stored,
            }
        };
        drop(rx);
        while !in_flight.is_empty() {
            collect(&mut in_flight, &mut parts).await.map_err(s3_err)?;
        }
        if parts.is_empty() {
            parts.push(Some(
                self.s3
                    .put_part(&self.path, &self.id, 0, Bytes::new().into())
                    .await
                    .map_err(s3_err)?,
            ));
        }
        let parts: Vec<PartId> = parts.into_iter().flatten().collect();
        self.s3
            .complete_multipart(&self.path, &self.id, parts)
            .await
            .map_err(s3_err)?;
        Ok(stored)
    }
}

type PartResult = (usize, object_store::Result<PartId>);

async fn collect(
    in_flight: &mut tokio::task::JoinSet<PartResult>,
    parts: &mut [Option<PartId>],
) -> object_store::Result<()> {
    if let Some(joined) = in_flight.join_next().await {
        let (idx, r) = joined.map_err(|e| object_store::Error::Generic {
            store: "S3",
            source: Box::new(e),
        })?;
        parts[idx] = Some(r?);
    }
    Ok(())
}

/// Aborts the S3 uploads recorded under `journal` (left by a run cut off from the server).
/// Only under the lock of what the journal belongs to.
pub async fn abort_journaled(store: &Store, journal: &str) -> Result<usize, StoreError> {
    let Store::S3 {
        store: s3, prefix, ..
    } = store
    else {
        return Ok(0);
    };
    let mut aborted = 0;
    for entry in store.list(journal).await? {
        let Some(text) = store.get(&entry.key, JOURNAL_LIMIT).await? else {
            continue;
        };
        let record: serde_json::Value = serde_json::from_slice(&text)
            .map_err(|e| StoreError::invalid(store.describe(&entry.key), e.to_string()))?;
        let (Some(key), Some(id)) = (record["key"].as_str(), record["upload_id"].as_str()) else {
            return Err(StoreError::invalid(
                store.describe(&entry.key),
                "not an upload journal entry",
            ));
        };
        let path = Store::s3_path(prefix, key)?;
        match s3.abort_multipart(&path, &id.to_owned()).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(source) => {
                return Err(StoreError::S3 {
                    what: store.describe(key),
                    source,
                })
            }
        }
        store.delete(&entry.key).await?;
        tracing::info!(
            "aborted an upload of {} left by an earlier run",
            store.describe(key)
        );
        aborted += 1;
    }
    Ok(aborted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_stay_under_the_limit() {
        assert_eq!(part_size(0), MIN_PART);
        assert_eq!(part_size(1 << 30), MIN_PART);
        for size in [80u64 << 30, 1 << 40, 5 << 40] {
            let p = part_size(size);
            assert!(size.div_ceil(p) <= MAX_PARTS, "{size}");
            assert_eq!(p % (1 << 20), 0);
        }
        assert_eq!(part_size(u64::MAX), MAX_PART);
    }

    #[tokio::test]
    async fn a_local_upload_is_kept_only_when_finished() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::Local(dir.path().to_path_buf());
        let (upload, mut w) = start(&store, "a/s.cbts", 10, "a/uploads").await.unwrap();
        let done = tokio::task::spawn_blocking(move || {
            let parts = [std::io::IoSlice::new(b"a"), std::io::IoSlice::new(b"bc")];
            assert_eq!(w.write_vectored(&parts).unwrap(), 3);
            Box::new(w).finish()
        });
        done.await.unwrap().unwrap();
        let stored = upload.finish().await.unwrap();
        assert_eq!(stored.bytes, 3);
        assert_eq!(
            stored.sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let (upload, mut w) = start(&store, "a/t.cbts", 10, "a/uploads").await.unwrap();
        tokio::task::spawn_blocking(move || {
            w.write_all(b"abc").unwrap();
            drop(w);
        })
        .await
        .unwrap();
        assert!(upload.finish().await.is_err());
        assert!(!dir.path().join("a/t.cbts").exists());
        assert!(dir.path().join("a/s.cbts").exists());
    }
}
