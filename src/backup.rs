//! `cbtstream export --xapi URL --vdi UUID` and `cbtstream gc`: the XenServer backup flow.
//!
//! ```text
//! login → check the VDI → VDI.snapshot (tagged) → list_changed_blocks(base, snapshot)
//!       → get_nbd_info(snapshot) → data plane → output complete and durable
//!       → state file (atomic) → data_destroy(snapshot), retried on VDI_IN_USE
//!       → destroy the previous base → logout
//! ```
//!
//! The invariant: the base advances only after the new export is complete and durable. On
//! any failure or signal before that, the new snapshot is destroyed and the state file and the
//! old base stay as they were. `list_changed_blocks` runs before any NBD connection: an open
//! connection plugs the snapshot into dom0 and the call would fail with VDI_IN_USE.

use crate::chain::{self, ChainState, STATE_VERSION};
use crate::cli::{ExportArgs, GcArgs, XapiArgs};
use crate::exit::{fail, Code, Failure, WithCode};
use crate::export::{created_now, run_data_plane, shutdown_signal, StreamIds};
use crate::nbd::{Address, ConnectOptions, Connection};
use crate::tls::{self, Trust};
use crate::xapi::{retry_on, Backoff, NbdInfo, Ref, Secret, XapiError, XapiSession};
use cbtstream_proto::cbt;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// other_config key on every snapshot cbtstream takes; its value is the VDI's uuid. `gc`
/// only ever touches snapshots that carry it.
pub const TAG_SNAPSHOT: &str = "cbtstream_snapshot_of";

fn src(e: XapiError) -> Failure {
    Failure {
        code: Code::Source,
        error: e.into(),
    }
}

/// The XenAPI password, from --password-file or $XAPI_PASSWORD: never from argv.
fn password(file: Option<&Path>) -> Result<Secret, Failure> {
    if let Some(path) = file {
        let text = std::fs::read_to_string(path).map_err(|e| {
            fail(
                Code::Usage,
                format!("reading the password file {}: {e}", path.display()),
            )
        })?;
        return Ok(Secret::new(text.trim_end_matches(['\n', '\r']).to_string()));
    }
    std::env::var("XAPI_PASSWORD")
        .map(Secret::new)
        .map_err(|_| {
            fail(
                Code::Usage,
                "no XenAPI password: set XAPI_PASSWORD or give --password-file FILE",
            )
        })
}

async fn login(url: &str, args: &XapiArgs) -> Result<XapiSession, Failure> {
    let pw = password(args.password_file.as_deref())?;
    let trust = tls::trust_from_flags(
        args.xapi_ca.as_deref(),
        None,
        args.xapi_pin.as_deref(),
        args.xapi_insecure,
    )
    .code(Code::Usage)?;
    XapiSession::login(url, &args.user, &pw, &trust, args.xapi_allow_plaintext)
        .await
        .map_err(|e| Failure {
            code: Code::Source,
            error: anyhow::Error::new(e).context("XenAPI login"),
        })
}

/// Retry `op` while it fails with VDI_IN_USE (the host keeps the snapshot attached to dom0
/// for a few seconds after the NBD connections close), with backoff, for about a minute.
async fn retry_in_use<F, Fut>(op: F) -> Result<(), XapiError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), XapiError>>,
{
    let backoff = Backoff {
        first: Duration::from_millis(200),
        max: Duration::from_secs(5),
    };
    retry_on(&["VDI_IN_USE"], 16, backoff, op).await
}

async fn destroy_snapshot(session: &XapiSession, snap: &Ref) {
    match retry_in_use(|| session.vdi_destroy(snap)).await {
        Ok(()) => tracing::info!("removed the uncommitted snapshot"),
        Err(e) => {
            tracing::warn!("could not remove the uncommitted snapshot ({e}); `cbtstream gc` will")
        }
    }
}

pub async fn export_xapi(args: ExportArgs) -> Result<(), Failure> {
    let Some(url) = args.xapi.clone() else {
        return Err(fail(Code::Usage, "give --xapi URL"));
    };
    if args.state.is_none() && args.base.is_none() && !args.full {
        return Err(fail(
            Code::Usage,
            "give --state FILE (the chain), --base SNAPSHOT_UUID, or --full",
        ));
    }
    let session = login(&url, &args.xapi_args).await?;
    // The snapshot taken but not yet committed: whatever happens, it is removed.
    let uncommitted: Arc<Mutex<Option<Ref>>> = Arc::default();
    let result = tokio::select! {
        r = backup(&session, &args, uncommitted.clone()) => r,
        sig = shutdown_signal() => Err(fail(Code::Interrupted, format!("interrupted by {sig}; nothing was committed"))),
    };
    let leftover = uncommitted.lock().ok().and_then(|mut g| g.take());
    if let Some(snap) = leftover {
        destroy_snapshot(&session, &snap).await;
    }
    session.logout().await;
    result
}

fn is_chain_broken(e: &XapiError) -> bool {
    e.is("SR_BACKEND_FAILURE_460") || e.is("SR_BACKEND_FAILURE_459") || e.is("VDI_NO_CBT_METADATA")
}

/// The chain cannot continue: a full export with --fallback-full, else a clear error.
fn chain_broken(args: &ExportArgs, why: String) -> Result<(), Failure> {
    if args.fallback_full {
        tracing::warn!("{why}; --fallback-full: starting a new chain with a full export");
        Ok(())
    } else {
        Err(fail(
            Code::Source,
            format!("{why}; start a new chain with --full, or pass --fallback-full"),
        ))
    }
}

async fn backup(
    session: &XapiSession,
    args: &ExportArgs,
    uncommitted: Arc<Mutex<Option<Ref>>>,
) -> Result<(), Failure> {
    let vdi_uuid = args.vdi.clone().unwrap_or_default();
    let vdi = session.vdi_get_by_uuid(&vdi_uuid).await.map_err(src)?;
    let rec = session.vdi_get_record(&vdi).await.map_err(src)?;
    if rec.is_a_snapshot {
        return Err(fail(
            Code::Usage,
            format!("VDI {vdi_uuid} is a snapshot; give the VDI itself"),
        ));
    }
    let mut full = args.full;
    if !rec.cbt_enabled {
        if !args.enable_cbt {
            return Err(fail(
                Code::Source,
                format!("changed block tracking is off for VDI {vdi_uuid}; pass --enable-cbt to turn it on (that export is a full one)"),
            ));
        }
        tracing::warn!(
            "turning changed block tracking on for VDI {vdi_uuid}; this export is a full one"
        );
        session.vdi_enable_cbt(&vdi).await.map_err(src)?;
        full = true;
    }

    let state = match &args.state {
        Some(p) => chain::load(p).code(Code::Usage)?,
        None => None,
    };
    if let Some(s) = &state {
        if s.vdi != vdi_uuid {
            return Err(fail(
                Code::Usage,
                format!("the state file is for VDI {}, not {vdi_uuid}", s.vdi),
            ));
        }
    }
    let base_uuid = match (&args.base, &state) {
        _ if full => None,
        (Some(b), _) => Some(b.clone()),
        (None, Some(s)) => Some(s.base.clone()),
        (None, None) => {
            tracing::info!("no chain state yet: this is the first, full export");
            None
        }
    };
    let mut base: Option<(String, Ref)> = None;
    if let Some(uuid) = &base_uuid {
        match session.vdi_get_by_uuid(uuid).await {
            Ok(r) => base = Some((uuid.clone(), r)),
            Err(e) if e.is("UUID_INVALID") || e.is("HANDLE_INVALID") => {
                chain_broken(args, format!("the base snapshot {uuid} no longer exists"))?
            }
            Err(e) => return Err(src(e)),
        }
    }

    // The snapshot. From here until the commit, any failure removes it.
    let snap = session
        .vdi_snapshot(&vdi, BTreeMap::new())
        .await
        .map_err(src)?;
    if let Ok(mut g) = uncommitted.lock() {
        *g = Some(snap.clone());
    }
    session
        .vdi_add_to_other_config(&snap, TAG_SNAPSHOT, &vdi_uuid)
        .await
        .map_err(src)?;
    let snap_rec = session.vdi_get_record(&snap).await.map_err(src)?;

    // The changed blocks, before any NBD connection to the snapshot.
    let mut bitmap = None;
    if let Some((uuid, vref)) = &base {
        match session.vdi_list_changed_blocks(vref, &snap).await {
            Ok(b64) => bitmap = Some(cbt::decode_base64(b64.as_bytes()).code(Code::Source)?),
            Err(e) if is_chain_broken(&e) => {
                chain_broken(args, format!("the chain from base {uuid} is broken ({e})"))?;
                base = None;
            }
            Err(e) => return Err(src(e)),
        }
    }

    let infos = session.vdi_get_nbd_info(&snap).await.map_err(src)?;
    let (first, opts) = connect_any(&infos, args).await?;
    let ids = StreamIds {
        source_id: vdi_uuid.clone(),
        point_id: snap_rec.uuid.clone(),
        base_id: base.as_ref().map(|(u, _)| u.clone()),
    };
    // Every NBD connection is closed when this returns.
    let progress = Arc::new(crate::progress::Bar::stderr());
    let dp = args.dp.options();
    let summary = run_data_plane(
        first,
        Arc::new(opts),
        bitmap,
        ids,
        &dp,
        &args.output,
        progress,
    )
    .await?;
    if args.dp.json {
        eprintln!("{}", summary.json());
    }

    // Commit 1: the state file says the new snapshot is the base. Only now.
    // The bases before this one: the state's, or the one given with --base. When this run
    // had to start a new chain, none of them can serve again.
    let mut older = state
        .as_ref()
        .map(|s| s.older_bases.clone())
        .unwrap_or_default();
    if let Some(b) = &base_uuid {
        older.push(b.clone());
    }
    let new_chain = base.is_none();
    let keep_older = if new_chain {
        0
    } else {
        (args.keep_bases as usize).saturating_sub(1)
    };
    let drop_count = older.len().saturating_sub(keep_older);
    let to_destroy: Vec<String> = older.drain(..drop_count).collect();
    let mut new_state = ChainState {
        version: STATE_VERSION,
        vdi: vdi_uuid.clone(),
        // The master actually used (after a HOST_IS_SLAVE redirect), without credentials.
        host: session.endpoint().url(),
        base: snap_rec.uuid.clone(),
        base_is_metadata: false,
        point_id: snap_rec.uuid.clone(),
        virtual_size: snap_rec.virtual_size,
        updated_unix_secs: created_now(),
        older_bases: older,
    };
    if let Some(p) = &args.state {
        chain::save(p, &new_state).code(Code::Output)?;
    }
    if let Ok(mut g) = uncommitted.lock() {
        *g = None;
    }

    // Commit 2: the snapshot's data goes; its CBT metadata stays as the next base.
    match retry_in_use(|| session.vdi_data_destroy(&snap)).await {
        Ok(()) => {
            new_state.base_is_metadata = true;
            if let Some(p) = &args.state {
                chain::save(p, &new_state).code(Code::Output)?;
            }
        }
        Err(e) => tracing::warn!(
            "VDI.data_destroy failed ({e}): the full snapshot {} stays on the host as the base; the next export still works",
            snap_rec.uuid
        ),
    }
    // Then the bases we no longer need (only ours: tagged snapshots).
    for uuid in to_destroy {
        let Ok(r) = session.vdi_get_by_uuid(&uuid).await else {
            continue;
        };
        match session.vdi_get_record(&r).await {
            Ok(old) if old.other_config.contains_key(TAG_SNAPSHOT) => {
                if let Err(e) = retry_in_use(|| session.vdi_destroy(&r)).await {
                    tracing::warn!("could not destroy the previous base {uuid}: {e}");
                }
            }
            _ => tracing::info!("left the previous base {uuid} alone: cbtstream did not create it"),
        }
    }
    Ok(())
}

/// Connect to the first NBD server from `get_nbd_info` that answers, trusting exactly the
/// certificate it lists and checking the name it gives.
async fn connect_any(
    infos: &[NbdInfo],
    args: &ExportArgs,
) -> Result<(Connection, ConnectOptions), Failure> {
    if infos.is_empty() {
        return Err(fail(
            Code::Source,
            "VDI.get_nbd_info returned no server: no network in the pool has the `nbd` purpose \
             (xe network-param-add param-name=purpose param-key=nbd uuid=<network>)",
        ));
    }
    let timeout = Duration::from_secs(args.dp.connect_timeout.max(1));
    let mut last = None;
    for info in infos {
        let trust =
            Trust::exact_cert_from_pem(info.cert_pem.as_bytes(), Path::new("get_nbd_info cert"))
                .code(Code::Source)?;
        let config = tls::client_config(&trust).code(Code::Source)?;
        let name = if info.subject.is_empty() {
            info.address.clone()
        } else {
            info.subject.clone()
        };
        let opts = ConnectOptions {
            address: Address::Tcp {
                host: info.address.clone(),
                port: info.port,
            },
            export: info.exportname.expose().to_string(),
            tls: Some((config, tls::server_name(&name).code(Code::Source)?)),
            connect_timeout: timeout,
            handshake_timeout: timeout,
            extended_headers: !args.dp.no_extended_headers,
            meta_context: true,
        };
        match Connection::connect(&opts).await {
            Ok(c) => return Ok((c, opts)),
            Err(e) => {
                tracing::warn!(server = %opts.address_label(), "NBD server failed: {e}; trying the next one");
                last = Some(e);
            }
        }
    }
    Err(fail(
        Code::Source,
        format!(
            "no NBD server of VDI.get_nbd_info answered; last error: {}",
            last.map(|e| e.to_string()).unwrap_or_default()
        ),
    ))
}

/// `cbtstream gc`: destroy snapshots that cbtstream took (tagged) and that are not the
/// chain's recorded bases: what a killed run left behind.
pub async fn gc(args: GcArgs) -> Result<(), Failure> {
    let keep: Vec<String> = match &args.state {
        Some(p) => match chain::load(p).code(Code::Usage)? {
            Some(s) => std::iter::once(s.base).chain(s.older_bases).collect(),
            None => Vec::new(),
        },
        None => Vec::new(),
    };
    let session = login(&args.xapi, &args.xapi_args).await?;
    let result = gc_inner(&session, &args, &keep).await;
    session.logout().await;
    result
}

async fn gc_inner(session: &XapiSession, args: &GcArgs, keep: &[String]) -> Result<(), Failure> {
    let vdi = session.vdi_get_by_uuid(&args.vdi).await.map_err(src)?;
    let mut removed = 0;
    for snap in &session.vdi_get_snapshots(&vdi).await.map_err(src)? {
        let s = session.vdi_get_record(snap).await.map_err(src)?;
        let ours = s
            .other_config
            .get(TAG_SNAPSHOT)
            .is_some_and(|v| *v == args.vdi);
        // Without a state file, a cbt_metadata snapshot may be a base: keep those.
        let is_base =
            keep.contains(&s.uuid) || (args.state.is_none() && s.vdi_type == "cbt_metadata");
        if !ours || is_base {
            continue;
        }
        if args.dry_run {
            println!("would remove snapshot {} ({})", s.uuid, s.vdi_type);
            continue;
        }
        retry_in_use(|| session.vdi_destroy(snap))
            .await
            .map_err(src)?;
        println!("removed snapshot {} ({})", s.uuid, s.vdi_type);
        removed += 1;
    }
    if !args.dry_run {
        tracing::info!(removed, "gc done");
    }
    Ok(())
}
