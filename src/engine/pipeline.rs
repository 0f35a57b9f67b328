//! How many reads to keep in flight, and how many bytes may be read but not yet written.

/// The rate the default pipeline is sized for: enough reads in flight to move 2 GB/s at the
/// measured round trip (a bandwidth-delay product), so a distant server is not read at the
/// pace of one round trip per few requests.
const TARGET_RATE: f64 = 2e9;

/// Reads in flight per connection, and the byte budget (read but not yet written).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pipeline {
    pub inflight: usize,
    pub budget: u64,
}

/// Size the pipeline: `inflight` as given, or enough for the bandwidth-delay product at the
/// handshake's round trip (`rtt`) with reads of `avg_read` bytes spread over `connections`,
/// at least 32 and at most 1024 a connection. The budget covers the bytes of those reads
/// (8-32 MiB; the floor leaves a reorder window when reads are small), or twice the
/// bandwidth-delay product (at most 256 MiB) when that is more. Sized by the average read,
/// not the largest: a fragmented incremental (64-128 KiB reads) needs far less than 32 MiB,
/// and its memory counts next to the bitmap's (32 MiB for 16 TiB).
pub fn size_pipeline(
    rtt: Option<std::time::Duration>,
    connections: usize,
    avg_read: u64,
    inflight: Option<u16>,
) -> Pipeline {
    let bdp = rtt.map_or(0.0, |r| r.as_secs_f64() * TARGET_RATE) as u64;
    let connections = connections.max(1) as u64;
    let inflight = match inflight {
        Some(n) => usize::from(n.max(1)),
        None => {
            let per_conn = bdp.div_ceil(connections * avg_read.max(1));
            per_conn.clamp(32, 1024) as usize
        }
    };
    let budget = (connections * inflight as u64 * avg_read)
        .clamp(8 << 20, 32 << 20)
        .max((2 * bdp).min(256 << 20));
    Pipeline { inflight, budget }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn pipeline_follows_the_bandwidth_delay_product() {
        let ms = |n: u64| Some(Duration::from_millis(n));
        // Loopback, or no measurement: the floor of 32; the budget covers the reads in flight.
        let p = size_pipeline(Some(Duration::from_micros(60)), 4, 64 << 10, None);
        assert_eq!(
            p,
            Pipeline {
                inflight: 32,
                budget: 8 << 20
            }
        );
        assert_eq!(size_pipeline(None, 4, 64 << 10, None).inflight, 32);
        let p = size_pipeline(None, 4, 128 << 10, None);
        assert_eq!(p.budget, 16 << 20);
        assert_eq!(size_pipeline(None, 4, 1 << 20, None).budget, 32 << 20);
        // 10 ms: 20 MB in flight: 77 reads of 64 KiB on each of 4 connections, 40 MB budget.
        let p = size_pipeline(ms(10), 4, 64 << 10, None);
        assert_eq!(p.inflight, 77);
        assert_eq!(p.budget, 40_000_000);
        // Large reads need few requests; the budget still covers the product.
        let p = size_pipeline(ms(10), 4, 2 << 20, None);
        assert_eq!(p.inflight, 32);
        assert_eq!(p.budget, 40_000_000);
        // A far server: capped.
        let p = size_pipeline(ms(500), 1, 64 << 10, None);
        assert_eq!(
            p,
            Pipeline {
                inflight: 1024,
                budget: 256 << 20
            }
        );
        // Given by the user: kept; the budget still follows the round trip.
        let p = size_pipeline(ms(10), 1, 64 << 10, Some(8));
        assert_eq!(p.inflight, 8);
        assert_eq!(p.budget, 40_000_000);
        assert_eq!(size_pipeline(None, 2, 1 << 20, Some(4)).budget, 8 << 20);
    }
}
