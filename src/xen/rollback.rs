//! `restore --xapi URL --vdi UUID --rollback STREAM...`: roll a VDI back to a point of its
//! own chain, writing only what changed since that point. The VDI still has the point's CBT
//! metadata on the host (its `cbt_metadata` base), so: snapshot the VDI, ask
//! `list_changed_blocks(point, snapshot)`, destroy that snapshot, and write back only those
//! blocks, each taken from the newest stream of the chain that holds it (the streams are
//! read newest first; a full stream holds every block). A 1 TiB disk that changed 2 GiB since
//! the point is rolled back in the time of 2 GiB.
//!
//! The VDI is marked `applying` (see [`super::restore`]) before the first write and
//! `complete` at the point after the last, so a rollback cut short never looks complete.

use super::restore::{
    check_sizes, existing_vdi, off_runtime, restore_failure, send_chain, PoolRestoreReport, Wanted,
    APPLYING, COMPLETE, POINT_KEY, SOURCE_KEY, STATE_KEY,
};
use super::{retry_in_use, src};
use crate::engine::Progress;
use crate::exit::{fail, Code, Failure, WithCode};
use crate::repo::restore::InputSpec;
use crate::restore::verified::open_chain;
use crate::restore::RestoreError;
use crate::xapi::XapiSession;
use cbtstream_proto::cbt;
use std::collections::BTreeMap;

pub(super) async fn rollback(
    session: &XapiSession,
    vdi_uuid: &str,
    inputs: &[InputSpec],
    progress: &dyn Progress,
) -> Result<PoolRestoreReport, Failure> {
    // Not in use by a running VM (the check of --vdi); which point it holds does not matter.
    let target = existing_vdi(session, vdi_uuid).await?;
    let (inputs, _) = InputSpec::open_all(inputs).await?;
    let streams = off_runtime(move || {
        open_chain(inputs, &|input| {
            Err(RestoreError::Usage(format!(
                "{input} is an incremental stream: a rollback needs the point's whole chain, \
                 from its full stream"
            )))
        })
    })
    .await?
    .map_err(restore_failure)?;
    check_sizes(&streams)?;
    let last = &streams[streams.len() - 1].header;
    let (point, source, size) = (
        last.point_id.clone(),
        last.source_id.clone(),
        last.virtual_size,
    );
    if source != vdi_uuid {
        return Err(fail(
            Code::Usage,
            format!("these streams are of disk {source:?}, not of VDI {vdi_uuid}"),
        ));
    }
    if size != target.size {
        return Err(fail(
            Code::Usage,
            format!(
                "VDI {vdi_uuid} is {} bytes but was {size} at point {point}: a rollback cannot \
                 resize it; restore the whole chain with --vdi instead",
                target.size
            ),
        ));
    }
    let point_ref = match session.vdi_get_by_uuid(&point).await {
        Ok(r) => r,
        Err(e) if e.is("UUID_INVALID") => {
            return Err(fail(
                Code::Source,
                format!(
                    "the point {point} is no longer on the host (its CBT metadata is gone), so \
                     what changed since it is unknown: restore the whole chain with --vdi instead"
                ),
            ))
        }
        Err(e) => return Err(src(e)),
    };

    // What changed since the point: a snapshot of the VDI now, compared, then gone.
    let now = session
        .vdi_snapshot(&target.vdi, BTreeMap::new())
        .await
        .map_err(src)?;
    // Tagged, so that gc finds it if this run is killed before it is gone.
    if let Err(e) = session
        .vdi_add_to_other_config(&now, super::TAG_SNAPSHOT, vdi_uuid)
        .await
    {
        tracing::warn!("could not tag the rollback's snapshot: {e}");
    }
    let changed = session.vdi_list_changed_blocks(&point_ref, &now).await;
    if let Err(e) = retry_in_use(|| session.vdi_destroy(&now)).await {
        tracing::warn!("could not remove the snapshot the rollback took ({e})");
    }
    let bitmap = cbt::decode_base64(changed.map_err(src)?.as_bytes()).code(Code::Source)?;
    cbt::validate(&bitmap, size).code(Code::Source)?;
    let blocks: u64 = bitmap.iter().map(|b| u64::from(b.count_ones())).sum();
    tracing::info!(
        blocks,
        bytes = blocks * cbt::CBT_BLOCK,
        "rolling back the blocks changed since the point"
    );

    for (key, value) in [
        (STATE_KEY, APPLYING),
        (POINT_KEY, point.as_str()),
        (SOURCE_KEY, source.as_str()),
    ] {
        session
            .vdi_set_other_config_key(&target.vdi, key, value)
            .await
            .map_err(src)?;
    }
    let mut report = PoolRestoreReport {
        vdi: vdi_uuid.to_owned(),
        point_id: point.clone(),
        ..PoolRestoreReport::default()
    };
    progress.start(blocks * cbt::CBT_BLOCK);
    let upload = session.import_raw_chunked(&target.vdi).await.map_err(src)?;
    // Newest first: the first stream that holds a block has its value at the point.
    let newest_first: Vec<_> = streams.into_iter().rev().collect();
    send_chain(
        session,
        upload,
        newest_first,
        false,
        Some(Wanted::new(bitmap, size)),
        progress,
        &mut report,
    )
    .await?;
    session
        .vdi_set_other_config_key(&target.vdi, STATE_KEY, COMPLETE)
        .await
        .map_err(src)?;
    tracing::info!(vdi = %vdi_uuid, point = %point, "rolled back");
    Ok(report)
}
