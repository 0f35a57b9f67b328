//! Buffer pools, so that steady state allocates nothing: read buffers (filled by the NBD
//! reader) and compression output buffers come back here once their bytes are written.

use bytes::BytesMut;
use std::sync::Mutex;

/// At most this many idle buffers are kept per pool; more are freed. The number of buffers
/// in use is bounded by the bytes-in-flight budget, not by the pool.
const MAX_IDLE: usize = 512;

/// At most this many bytes of idle read buffers are kept, over all size classes: a pool that
/// kept each class's busiest moment would hold the budget once per class.
const MAX_IDLE_BYTES: usize = 8 << 20;

/// Read buffers by size class (powers of two), so a small read never pins a large buffer:
/// the memory in use is at most twice the bytes in flight.
#[derive(Default)]
pub struct BufPool {
    classes: Mutex<Classes>,
}

#[derive(Default)]
struct Classes {
    idle: Vec<Vec<BytesMut>>,
    idle_bytes: usize,
}

fn class(len: usize) -> usize {
    len.max(4096).next_power_of_two().trailing_zeros() as usize
}

impl BufPool {
    /// A buffer with room for at least `len` bytes.
    pub fn get(&self, len: usize) -> BytesMut {
        let c = class(len);
        let pooled = self.classes.lock().ok().and_then(|mut g| {
            let b = g.idle.get_mut(c).and_then(|b| b.pop())?;
            g.idle_bytes -= b.capacity();
            Some(b)
        });
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
        if let Ok(mut g) = self.classes.lock() {
            if g.idle.len() <= c {
                g.idle.resize_with(c + 1, Vec::new);
            }
            if g.idle[c].len() < MAX_IDLE && g.idle_bytes + cap <= MAX_IDLE_BYTES {
                g.idle_bytes += cap;
                g.idle[c].push(b);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_buffers_are_bounded_in_bytes() {
        let pool = BufPool::default();
        let bufs: Vec<BytesMut> = (0..20).map(|_| pool.get(1 << 20)).collect();
        for b in bufs {
            pool.put(b);
        }
        let idle = pool.classes.lock().unwrap().idle_bytes;
        assert_eq!(idle, MAX_IDLE_BYTES);
        // Taking one gives its bytes back to the count.
        let b = pool.get(1 << 20);
        assert!(b.capacity() >= 1 << 20);
        assert_eq!(
            pool.classes.lock().unwrap().idle_bytes,
            MAX_IDLE_BYTES - b.capacity()
        );
    }
}
