//! Serve an image file with the XenServer (`xapi-nbd`) NBD profile, for manual tests and
//! benchmarks. Prints one JSON line with the port (and the TLS files), then serves until
//! killed (SIGINT/SIGTERM).
//!
//! ```text
//! xen-nbd-server --image disk.img [--port 0] [--bind 127.0.0.1]
//!                [--cert cert.pem --key key.pem | --cert-dir DIR] [--export NAME]
//!                [--size BYTES] [--notls] [--max-connections 16] [--close-after-error]
//! ```
//!
//! Without `--cert`/`--key`, a XAPI-style self-signed RSA-2048 certificate for
//! localhost/127.0.0.1 is generated in `--cert-dir` (or a temporary directory), together
//! with a libnbd `tls-certificates=` directory (`libnbd_dir` in the output). Without
//! `--export`, any export name is accepted.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use cbtstream_testkit::xapi_style_self_signed;
use cbtstream_testkit::xen_nbd::{
    libnbd_tls_dir, Export, XenNbdConfig, XenNbdServer, DEFAULT_MAX_CONNECTIONS,
};

const USAGE: &str = "usage: xen-nbd-server --image PATH [--port N] [--bind ADDR] \
[--cert PEM --key PEM | --cert-dir DIR] [--export NAME] [--size BYTES] [--notls] \
[--max-connections N] [--close-after-error]";

#[derive(Debug, Default)]
struct Args {
    image: Option<PathBuf>,
    port: u16,
    bind: Option<IpAddr>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    cert_dir: Option<PathBuf>,
    export: Option<String>,
    size: Option<u64>,
    notls: bool,
    max_connections: Option<usize>,
    close_after_error: bool,
}

fn parse_args() -> Result<Args> {
    let mut a = Args::default();
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut val = || -> Result<String> {
            match inline.clone() {
                Some(v) => Ok(v),
                None => it.next().with_context(|| format!("{flag} needs a value")),
            }
        };
        match flag.as_str() {
            "--image" => a.image = Some(val()?.into()),
            "--port" => a.port = val()?.parse().context("--port")?,
            "--bind" => a.bind = Some(val()?.parse().context("--bind")?),
            "--cert" => a.cert = Some(val()?.into()),
            "--key" => a.key = Some(val()?.into()),
            "--cert-dir" => a.cert_dir = Some(val()?.into()),
            "--export" => a.export = Some(val()?),
            "--size" => a.size = Some(val()?.parse().context("--size")?),
            "--max-connections" => {
                a.max_connections = Some(val()?.parse().context("--max-connections")?)
            }
            "--notls" => a.notls = true,
            "--close-after-error" => a.close_after_error = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    Ok(a)
}

/// A JSON string literal (paths and names are expected to be mostly printable).
fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let image = args.image.clone().context(USAGE)?;
    let image = std::path::absolute(&image)?;
    let size = match args.size {
        Some(s) => s,
        None => std::fs::metadata(&image)
            .with_context(|| format!("stat {}", image.display()))?
            .len(),
    };

    // Keeps a generated temporary certificate directory alive while serving.
    let mut _tmp = None;
    let (cert, key, libnbd_dir) = if args.notls {
        (PathBuf::new(), PathBuf::new(), None)
    } else {
        match (&args.cert, &args.key) {
            (Some(c), Some(k)) => (std::path::absolute(c)?, std::path::absolute(k)?, None),
            (None, None) => {
                let dir = match &args.cert_dir {
                    Some(d) => std::path::absolute(d)?,
                    None => {
                        let t = tempfile::tempdir()?;
                        let p = t.path().to_path_buf();
                        _tmp = Some(t);
                        p
                    }
                };
                let c = xapi_style_self_signed(&dir)?;
                let libnbd = libnbd_tls_dir(&c.cert_pem_path, &dir.join("libnbd"))?;
                (c.cert_pem_path, c.key_pem_path, Some(libnbd))
            }
            _ => bail!("give both --cert and --key, or neither"),
        }
    };

    let name = args.export.clone();
    let path = image.clone();
    let resolver = Arc::new(move |asked: &str| {
        if name.as_deref().is_some_and(|n| n != asked) {
            return None;
        }
        Some(Export {
            path: path.clone(),
            size,
            guard: None,
        })
    });
    let mut cfg = XenNbdConfig::new(cert.clone(), key, resolver);
    cfg.tls = !args.notls;
    cfg.bind = SocketAddr::new(
        args.bind.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        args.port,
    );
    cfg.max_connections = args.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS);
    cfg.close_after_error = args.close_after_error;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let server = XenNbdServer::start(cfg).await?;
        let export = args.export.as_deref().unwrap_or("any");
        let mut line = format!(
            "{{\"port\": {}, \"addr\": {}, \"tls\": {}, \"export\": {}, \"size\": {}, \"image\": {}, \"uri\": {}",
            server.port,
            json_str(&server.addr.to_string()),
            server.is_tls(),
            args.export.as_deref().map(json_str).unwrap_or_else(|| "null".into()),
            size,
            json_str(&image.display().to_string()),
            json_str(&server.uri(export)),
        );
        if server.is_tls() {
            line.push_str(&format!(", \"cert\": {}", json_str(&cert.display().to_string())));
        }
        if let Some(d) = &libnbd_dir {
            line.push_str(&format!(", \"libnbd_dir\": {}", json_str(&d.display().to_string())));
        }
        line.push('}');
        println!("{line}");
        use std::io::Write;
        std::io::stdout().flush()?;

        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        drop(server);
        anyhow::Ok(())
    })
}
