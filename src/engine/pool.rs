//! Buffer pools, so that steady state allocates nothing: read buffers (filled by the NBD
//! reader) and compression output buffers come back here once their bytes are written.

use bytes::BytesMut;
use std::sync::Mutex;

/// At most this many idle buffers are kept per pool; more are freed. The number of buffers
/// in use is bounded by the bytes-in-flight budget, not by the pool.
const MAX_IDLE: usize = 512;

/// Read buffers by size class (powers of two), so a small read never pins a large buffer:
/// the memory held is at most twice the bytes in flight.
#[derive(Default)]
pub struct BufPool {
    classes: Mutex<Vec<Vec<BytesMut>>>,
}

fn class(len: usize) -> usize {
    len.max(4096).next_power_of_two().trailing_zeros() as usize
}

impl BufPool {
    /// A buffer with room for at least `len` bytes.
    pub fn get(&self, len: usize) -> BytesMut {
        let c = class(len);
        let pooled = self
            .classes
            .lock()
            .ok()
            .and_then(|mut v| v.get_mut(c).and_then(|b| b.pop()));
        pooled.unwrap_or_else(|| BytesMut::with_capacity(1 << c))
    }

    pub fn put(&self, mut b: BytesMut) {
        b.clear();
        let cap = b.capacity();
        if cap < 4096 {
            return;
        }
        // The largest class this buffer can serve.
        let c = (usize::BITS - 1 - cap.leading_zeros()) as usize;
        if let Ok(mut v) = self.classes.lock() {
            if v.len() <= c {
                v.resize_with(c + 1, Vec::new);
            }
            if v[c].len() < MAX_IDLE {
                v[c].push(b);
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
