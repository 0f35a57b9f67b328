//! A stream object read as a `std::io::Read` (for restore and merge, which run on blocking
//! threads): range requests of [`CHUNK`] bytes, the next one already in flight while the
//! current one is consumed. Nothing is staged on local disk; memory is two chunks.
//!
//! The first range is small and nothing more is asked for until it is read: restore and
//! merge read the header of every stream of a chain before the records of any, and a long
//! chain must not hold two chunks per stream meanwhile.

use super::store::{Store, StoreError};
use bytes::{Buf, Bytes};
use std::io::Read;
use tokio::runtime::Handle;
use tokio::task::JoinHandle;

const CHUNK: u64 = 8 << 20;
/// The first range: enough for the header.
const FIRST_CHUNK: u64 = 64 << 10;

pub struct ObjectReader {
    store: Store,
    key: String,
    size: u64,
    /// Offset of the next range to ask for.
    next_offset: u64,
    current: Bytes,
    next: Option<JoinHandle<Result<Bytes, StoreError>>>,
    runtime: Handle,
}

impl ObjectReader {
    /// Opens `key` (its size from a HEAD request). Call from within the runtime; read from a
    /// blocking thread.
    pub async fn open(store: &Store, key: &str) -> Result<ObjectReader, StoreError> {
        let size = store.size(key).await?.ok_or_else(|| StoreError::Io {
            what: store.describe(key),
            source: std::io::ErrorKind::NotFound.into(),
        })?;
        let mut r = ObjectReader {
            store: store.clone(),
            key: key.to_owned(),
            size,
            next_offset: 0,
            current: Bytes::new(),
            next: None,
            runtime: Handle::current(),
        };
        r.prefetch();
        Ok(r)
    }

    /// The object's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn prefetch(&mut self) {
        if self.next_offset >= self.size {
            return;
        }
        let chunk = if self.next_offset == 0 {
            FIRST_CHUNK
        } else {
            CHUNK
        };
        let end = (self.next_offset + chunk).min(self.size);
        let (store, key, range) = (self.store.clone(), self.key.clone(), self.next_offset..end);
        self.next_offset = end;
        self.next = Some(
            self.runtime
                .spawn(async move { store.get_range(&key, range).await }),
        );
    }
}

impl Drop for ObjectReader {
    fn drop(&mut self) {
        if let Some(n) = self.next.take() {
            n.abort();
        }
    }
}

impl Read for ObjectReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.current.is_empty() {
            if self.next.is_none() {
                // The first range was read: from here on, one range ahead.
                self.prefetch();
            }
            let Some(next) = self.next.take() else {
                return Ok(0);
            };
            let got = self
                .runtime
                .block_on(next)
                .map_err(std::io::Error::other)?
                .map_err(std::io::Error::other)?;
            let first = self.next_offset <= FIRST_CHUNK;
            self.current = got;
            if !first {
                self.prefetch();
            }
        }
        let n = buf.len().min(self.current.len());
        self.current.copy_to_slice(&mut buf[..n]);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_an_object_across_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::Local(dir.path().to_path_buf());
        let data: Vec<u8> = (0..(CHUNK as usize * 2 + 12345))
            .map(|i| (i % 251) as u8)
            .collect();
        store.put("x/s", data.clone()).await.unwrap();
        let mut r = ObjectReader::open(&store, "x/s").await.unwrap();
        let back = tokio::task::spawn_blocking(move || {
            let mut v = Vec::new();
            r.read_to_end(&mut v).unwrap();
            v
        })
        .await
        .unwrap();
        assert!(back == data);
    }

    /// Reading a header asks for the first, small range only.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_header_read_holds_only_the_first_range() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::Local(dir.path().to_path_buf());
        store.put("x/s", vec![7; 3 * CHUNK as usize]).await.unwrap();
        let mut r = ObjectReader::open(&store, "x/s").await.unwrap();
        let r = tokio::task::spawn_blocking(move || {
            let mut header = [0; 100];
            r.read_exact(&mut header).unwrap();
            r
        })
        .await
        .unwrap();
        assert!(r.next.is_none());
        assert_eq!(r.current.len() as u64, FIRST_CHUNK - 100);
    }
}
