//! Buffer pools, so that steady state allocates nothing: read buffers (filled by the NBD
//! reader) and compression output buffers come back here once their bytes are written.

use bytes::BytesMut;
use std::sync::Mutex;

/// At most this many idle buffers are kept per pool; more are freed. The number of buffers
/// in use is bounded by the bytes-in-flight budget, not by the pool.
const MAX_IDLE: usize = 512;

#[derive(Default)]
pub struct BufPool {
    bufs: Mutex<Vec<BytesMut>>,
}

impl BufPool {
    pub fn get(&self) -> BytesMut {
        self.bufs
            .lock()
            .ok()
            .and_then(|mut v| v.pop())
            .unwrap_or_default()
    }

    pub fn put(&self, mut b: BytesMut) {
        b.clear();
        if let Ok(mut v) = self.bufs.lock() {
            if v.len() < MAX_IDLE {
                v.push(b);
            }
        }
    }
}

#[derive(Default)]
pub struct VecPool {
    bufs: Mutex<Vec<Vec<u8>>>,
}

impl VecPool {
    pub fn get(&self) -> Vec<u8> {
        self.bufs
            .lock()
            .ok()
            .and_then(|mut v| v.pop())
            .unwrap_or_default()
    }

    pub fn put(&self, mut b: Vec<u8>) {
        b.clear();
        if let Ok(mut v) = self.bufs.lock() {
            if v.len() < MAX_IDLE {
                v.push(b);
            }
        }
    }
}

/// Both pools, shared by every stage.
#[derive(Default)]
pub struct Pools {
    pub read: BufPool,
    pub out: VecPool,
}
