//! TCP proxy that adds a fixed one-way delay in each direction, for bench/bench.sh (this
//! kernel has no netem).
//!
//!     latency-proxy UPSTREAM_PORT DELAY_MS [--parent PID]
//!
//! Listens on 127.0.0.1 (an ephemeral port, printed on the first line of stdout) and forwards
//! each connection to 127.0.0.1:UPSTREAM_PORT. Every chunk is stamped when it is read and
//! written when it is due, in order: a delay line, so the delay does not add up and does not
//! limit bandwidth (the Python proxy it replaces passed at most ~500 MB/s, which hid what the
//! clients do). It holds at most 256 MiB per direction in flight. It exits when PID (default:
//! the parent process) is gone.
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;

const CHUNK: usize = 256 * 1024;
const IN_FLIGHT: usize = 256 << 20;

fn main() -> anyhow::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut parent = std::os::unix::process::parent_id();
    if let Some(i) = args.iter().position(|a| a == "--parent") {
        parent = args
            .get(i + 1)
            .ok_or_else(|| anyhow::anyhow!("--parent needs a PID"))?
            .parse()?;
        args.drain(i..i + 2);
    }
    let [upstream, delay] = args.as_slice() else {
        anyhow::bail!("usage: latency-proxy UPSTREAM_PORT DELAY_MS [--parent PID]");
    };
    let upstream: u16 = upstream.parse()?;
    let delay = Duration::from_secs_f64(delay.parse::<f64>()? / 1000.0);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(serve(upstream, delay, parent))
}

async fn serve(upstream: u16, delay: Duration, parent: u32) -> anyhow::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    println!("{}", listener.local_addr()?.port());
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if !std::path::Path::new(&format!("/proc/{parent}")).exists() {
                std::process::exit(0);
            }
        }
    });
    loop {
        let (client, _) = listener.accept().await?;
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::join!(pump(cr, sw, delay), pump(sr, cw, delay));
        });
    }
}

/// Copy one direction, each chunk `delay` after it was read.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
) {
    let room = std::sync::Arc::new(Semaphore::new(IN_FLIGHT));
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>, _)>();
    let reader = tokio::spawn(async move {
        loop {
            let Ok(permit) = room.clone().acquire_many_owned(CHUNK as u32).await else {
                return;
            };
            let mut buf = Vec::with_capacity(CHUNK);
            let n = from.read_buf(&mut buf).await.unwrap_or(0);
            if tx.send((Instant::now() + delay, buf, permit)).is_err() || n == 0 {
                return;
            }
        }
    });
    while let Some((due, buf, permit)) = rx.recv().await {
        tokio::time::sleep_until(due).await;
        if buf.is_empty() || to.write_all(&buf).await.is_err() {
            break;
        }
        drop(permit);
    }
    let _ = to.shutdown().await;
    reader.abort();
}
