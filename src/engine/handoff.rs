//! The hand-off from the fetch workers to the compression threads, or (without
//! compression) straight to the sink.

use super::fetch::FetchError;
use super::pool::Pools;
use super::{encode, Encoded, Fetched, ToSink};
use std::sync::Arc;

/// Where fetched ranges go: to the compression workers, or (without compression) straight to
/// the sink.
#[derive(Clone)]
pub enum Downstream {
    Compress(std::sync::mpsc::Sender<Fetched>),
    Sink(std::sync::mpsc::Sender<ToSink>),
}

/// A fetch worker's way downstream. Without compression the records are made here, on the
/// reactor thread, while the bytes the TLS reader just wrote are still in this core's cache
/// (checksumming them on the sink thread's core read them from memory again), and sent to
/// the sink in batches. With zstd, ranges go to the compression threads one by one, so that
/// every thread gets work.
pub struct Batch {
    down: Downstream,
    pools: Arc<Pools>,
    ecfg: encode::EncodeConfig,
    items: Vec<Encoded>,
    bytes: u64,
}

impl Batch {
    const MAX_ITEMS: usize = 32;
    const MAX_BYTES: u64 = 2 << 20;

    pub fn new(down: Downstream, pools: Arc<Pools>, ecfg: encode::EncodeConfig) -> Batch {
        Batch {
            down,
            pools,
            ecfg,
            items: Vec::new(),
            bytes: 0,
        }
    }

    /// Pass on one fetched range.
    pub fn push(&mut self, f: Fetched) -> Result<(), FetchError> {
        match &self.down {
            Downstream::Compress(tx) => tx.send(f).map_err(|_| FetchError::OutputClosed),
            Downstream::Sink(_) => {
                self.bytes += f.len;
                let e =
                    encode::encode(f, None, &self.pools, &self.ecfg).map_err(FetchError::Encode)?;
                self.items.push(e);
                if self.items.len() >= Self::MAX_ITEMS || self.bytes >= Self::MAX_BYTES {
                    self.flush()
                } else {
                    Ok(())
                }
            }
        }
    }

    /// Send what is queued. Workers flush whenever they have no read outstanding, so items
    /// never wait here for reads that are not coming (they hold budget the planner needs).
    pub fn flush(&mut self) -> Result<(), FetchError> {
        if self.items.is_empty() {
            return Ok(());
        }
        self.bytes = 0;
        let items = std::mem::take(&mut self.items);
        match &self.down {
            Downstream::Sink(tx) => tx
                .send(ToSink::Batch(items))
                .map_err(|_| FetchError::OutputClosed),
            // Compression workers are never batched.
            Downstream::Compress(_) => Ok(()),
        }
    }
}
