//! Restoring from a repository (`restore --repo`, `restore-vm --repo`): the point a command
//! names (`latest` is the newest), a disk of it, and the chain of stream objects that
//! restores that disk. The objects are read as they are consumed (ranged GETs through
//! [`ObjectReader`]); nothing is staged on local disk.

use super::reader::ObjectReader;
use super::store::{valid_name, Store};
use super::{point_dir, Points, Repo, RepoError, StoredPoint};
use crate::exit::{fail, Code, Failure};
use crate::restore::StreamInput;
use crate::xen::point::PointDisk;
use std::path::{Path, PathBuf};

/// A stream to read, not opened yet: clonable, so that options can hold a chain of them.
#[derive(Debug, Clone)]
pub enum InputSpec {
    /// A file, or `-` for stdin.
    Path(PathBuf),
    /// An object of a repository.
    Object { store: Store, key: String },
}

impl InputSpec {
    pub fn paths(paths: &[PathBuf]) -> Vec<InputSpec> {
        paths.iter().cloned().map(InputSpec::Path).collect()
    }

    /// Opens every input (a file when it is first read; an object's size asked for now),
    /// and says how many bytes they hold together, as far as that is known. Call from the
    /// runtime; read the inputs from a thread of their own.
    pub async fn open_all(specs: &[InputSpec]) -> Result<(Vec<StreamInput>, u64), Failure> {
        let mut inputs = Vec::with_capacity(specs.len());
        let mut total = 0;
        for spec in specs {
            match spec {
                InputSpec::Path(p) => {
                    total += std::fs::metadata(p).map_or(0, |m| m.len());
                    inputs.push(StreamInput::Path(p.clone()));
                }
                InputSpec::Object { store, key } => {
                    let reader = ObjectReader::open(store, key)
                        .await
                        .map_err(|e| read_failure(RepoError::Store(e)))?;
                    total += reader.size();
                    inputs.push(StreamInput::Reader {
                        name: store.describe(key),
                        reader: Box::new(reader),
                    });
                }
            }
        }
        Ok((inputs, total))
    }
}

/// The exit code of a repository error while reading from it: it is the source here.
pub fn read_failure(e: RepoError) -> Failure {
    let code = match &e {
        RepoError::Store(_) => Code::Source,
        other => crate::repo_cli::repo_code(other),
    };
    Failure {
        code,
        error: e.into(),
    }
}

/// The points of `vm` and the id of the one `point` names (`latest`: the newest). An
/// unknown VM or point is a usage error.
pub async fn find_point(repo: &Repo, vm: &str, point: &str) -> Result<(Points, String), Failure> {
    if !valid_name(vm) {
        return Err(fail(Code::Usage, format!("--vm {vm:?} is not a VM uuid")));
    }
    let points = repo.points(vm).await.map_err(read_failure)?;
    let Some(newest) = points.points.last() else {
        return Err(fail(
            Code::Usage,
            format!("the repository {} has no point of VM {vm}", repo.location),
        ));
    };
    let id = if point == "latest" {
        newest.info.id.clone()
    } else if points.get(point).is_some() {
        point.to_owned()
    } else {
        return Err(fail(
            Code::Usage,
            format!(
                "VM {vm} has no point {point:?} in the repository {} (`cbtstream list` shows them)",
                repo.location
            ),
        ));
    };
    Ok((points, id))
}

/// The disk of `point` that `selector` names: its slot or its id.
pub fn select_disk<'a>(point: &'a StoredPoint, selector: &str) -> Result<&'a PointDisk, Failure> {
    let disks = &point.info.disks;
    disks
        .iter()
        .find(|d| d.slot == selector || d.id == selector)
        .ok_or_else(|| {
            let held: Vec<String> = disks
                .iter()
                .map(|d| format!("slot {} ({})", d.slot, d.id))
                .collect();
            fail(
                Code::Usage,
                format!(
                    "point {} has no disk {selector:?}; it holds {}",
                    point.info.id,
                    held.join(", ")
                ),
            )
        })
}

/// The one disk of a point given without `--disk`.
pub fn only_disk(point: &StoredPoint) -> Result<&PointDisk, Failure> {
    match point.info.disks.as_slice() {
        [d] => Ok(d),
        disks => Err(fail(
            Code::Usage,
            format!(
                "point {} holds {} disks: choose one with --disk SLOT|VDI_UUID",
                point.info.id,
                disks.len()
            ),
        )),
    }
}

/// One stream of a disk's chain: the point that holds it and its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub point: String,
    pub stream: String,
    pub key: String,
}

/// The streams restoring disk `disk_id` to `point`, oldest first, following each point's
/// `base` for that disk back to its full stream; fails naming what breaks the chain (a
/// missing point, a point without that disk, a stream name that is no file name, a loop).
/// Whether the objects are there is not checked here.
pub fn disk_links(
    points: &Points,
    vm: &str,
    point: &str,
    disk_id: &str,
) -> Result<Vec<Link>, String> {
    let mut links: Vec<Link> = Vec::new();
    let mut next = Some(point.to_owned());
    while let Some(pid) = next {
        let Some(p) = points.get(&pid) else {
            return Err(match links.last() {
                Some(after) => format!(
                    "disk {disk_id} of point {} needs point {pid}, which is not in the repository",
                    after.point
                ),
                None => format!("there is no point {pid}"),
            });
        };
        let Some(d) = p.info.disks.iter().find(|d| d.id == disk_id) else {
            return Err(format!("point {pid} holds no stream of disk {disk_id}"));
        };
        if !valid_name(&d.stream) {
            return Err(format!(
                "point {pid} names a stream {:?} that is not a file name",
                d.stream
            ));
        }
        if links.len() >= points.points.len() {
            return Err(format!("the bases of disk {disk_id} form a loop at {pid}"));
        }
        links.push(Link {
            point: pid.clone(),
            stream: d.stream.clone(),
            key: format!("{}/{}", point_dir(vm, &pid), d.stream),
        });
        next = d.base.clone();
    }
    links.reverse();
    Ok(links)
}

/// The stream objects restoring `disk_id` to `point`, each one checked to be there: a
/// broken chain or a missing object is an integrity failure naming the point and the file.
pub fn disk_inputs(
    repo: &Repo,
    points: &Points,
    vm: &str,
    point: &str,
    disk_id: &str,
) -> Result<Vec<InputSpec>, Failure> {
    Ok(present_links(repo, points, vm, point, disk_id)?
        .into_iter()
        .map(|(link, _)| object(repo, link))
        .collect())
}

fn object(repo: &Repo, link: Link) -> InputSpec {
    InputSpec::Object {
        store: repo.store.clone(),
        key: link.key,
    }
}

/// [`disk_links`], each object checked to be there, with its size.
fn present_links(
    repo: &Repo,
    points: &Points,
    vm: &str,
    point: &str,
    disk_id: &str,
) -> Result<Vec<(Link, u64)>, Failure> {
    let links = disk_links(points, vm, point, disk_id)
        .map_err(|e| fail(Code::Integrity, format!("VM {vm}: {e}")))?;
    links
        .into_iter()
        .map(|link| {
            let listed = points
                .get(&link.point)
                .and_then(|p| p.files.iter().find(|f| f.key == link.key));
            match listed {
                Some(o) => Ok((link, o.size)),
                None => Err(fail(
                    Code::Integrity,
                    format!(
                        "point {} of VM {vm}: its stream {} is missing ({})",
                        link.point,
                        link.stream,
                        repo.store.describe(&link.key)
                    ),
                )),
            }
        })
        .collect()
}

/// The streams still to apply to `image`: when its sidecar says it holds a point of this
/// chain completely, only those after it (none when it holds the last one); else all of
/// them (restore then checks the image, or replaces it from the full stream). Headers are
/// read newest first, so an image one point behind costs two small reads.
async fn still_to_apply(
    repo: &Repo,
    image: &Path,
    links: Vec<(Link, u64)>,
) -> Result<Vec<(Link, u64)>, Failure> {
    let state = match crate::restore::image_state(image) {
        Ok(Some(s)) if s.status == crate::restore::ImageStatus::Complete => s,
        _ => return Ok(links),
    };
    for i in (0..links.len()).rev() {
        let (link, size) = &links[i];
        let Some(h) = read_header(&repo.store, &link.key, *size).await? else {
            break;
        };
        if h.point_id == state.point_id && h.source_id == state.source_id {
            return Ok(links[i + 1..].to_vec());
        }
    }
    Ok(links)
}

/// The header of a stream object; `None` when it does not decode (restore reports that).
async fn read_header(
    store: &Store,
    key: &str,
    size: u64,
) -> Result<Option<cbtstream_proto::stream::Header>, Failure> {
    use cbtstream_proto::stream::{Decoder, Item, MAX_HEADER_LEN};
    let end = size.min(MAX_HEADER_LEN as u64);
    let bytes = store
        .get_range(key, 0..end)
        .await
        .map_err(|e| read_failure(RepoError::Store(e)))?;
    let mut buf = bytes::BytesMut::from(&bytes[..]);
    Ok(match Decoder::new().decode(&mut buf) {
        Ok(Some(Item::Header(h))) => Some(h),
        _ => None,
    })
}

/// The stream objects of one disk of a point, for a restore into the pool: `disk` names
/// it (slot or VDI uuid), or the point holds only one.
pub async fn pool_inputs(
    repo: &Repo,
    vm: &str,
    point: &str,
    disk: Option<&str>,
) -> Result<Vec<InputSpec>, Failure> {
    let (points, id) = find_point(repo, vm, point).await?;
    let stored = found(&points, &id)?;
    let d = match disk {
        Some(selector) => select_disk(stored, selector)?,
        None => only_disk(stored)?,
    };
    disk_inputs(repo, &points, vm, &id, &d.id)
}

/// The point [`find_point`] found.
pub fn found<'a>(points: &'a Points, id: &str) -> Result<&'a StoredPoint, Failure> {
    points
        .get(id)
        .ok_or_else(|| fail(Code::Failure, "internal error: the point went missing"))
}

/// `restore --repo --to`: with `disk`, that disk into the image `to`; without, every disk
/// of the point into `to/disk<slot>.raw` (`to` an existing directory), or the point's only
/// disk into the image `to`. An image that holds
/// an earlier point of the chain gets only the streams after it. A line per image.
pub async fn restore_images(
    repo: &Repo,
    vm: &str,
    point: &str,
    disk: Option<&str>,
    to: &Path,
) -> Result<Vec<String>, Failure> {
    let (points, id) = find_point(repo, vm, point).await?;
    let stored = found(&points, &id)?;
    let targets: Vec<(&PointDisk, PathBuf)> = match disk {
        Some(selector) => vec![(select_disk(stored, selector)?, to.to_owned())],
        None if to.is_dir() => stored
            .info
            .disks
            .iter()
            .map(|d| {
                if valid_name(&d.slot) {
                    Ok((d, to.join(format!("disk{}.raw", d.slot))))
                } else {
                    Err(fail(
                        Code::Integrity,
                        format!("point {id} names a slot {:?}", d.slot),
                    ))
                }
            })
            .collect::<Result<_, _>>()?,
        None => match stored.info.disks.as_slice() {
            [d] => vec![(d, to.to_owned())],
            _ => {
                return Err(fail(
                    Code::Usage,
                    format!(
                        "{} is not a directory: give an existing directory (every disk of the \
                         point goes to DIR/disk<slot>.raw) or --disk SLOT|VDI_UUID with an image",
                        to.display()
                    ),
                ))
            }
        },
    };
    // Every chain checked before any image is touched.
    let mut work = Vec::with_capacity(targets.len());
    for (d, image) in targets {
        work.push((present_links(repo, &points, vm, &id, &d.id)?, image));
    }
    let mut reports = Vec::with_capacity(work.len());
    for (links, image) in work {
        let links = still_to_apply(repo, &image, links).await?;
        if links.is_empty() {
            reports.push(format!(
                "{} holds point {id} already: nothing to apply",
                image.display()
            ));
            continue;
        }
        let specs: Vec<InputSpec> = links.into_iter().map(|(l, _)| object(repo, l)).collect();
        let (inputs, _) = InputSpec::open_all(&specs).await?;
        let report =
            tokio::task::spawn_blocking(move || crate::restore::restore_inputs(&image, inputs))
                .await
                .map_err(|e| fail(Code::Failure, format!("the restore thread failed: {e}")))?
                .map_err(|e| Failure {
                    code: e.exit_code(),
                    error: e.into(),
                })?;
        reports.push(report.to_string());
    }
    Ok(reports)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::store::ObjectInfo;
    use crate::xen::point::PointInfo;

    fn point(id: &str, base: Option<&str>, disks: &[(&str, Option<&str>)]) -> StoredPoint {
        let info = PointInfo {
            id: id.into(),
            vm: "vm".into(),
            name: "vm".into(),
            time: format!("2026-11-30T00:00:0{}Z", &id[1..]),
            base: base.map(Into::into),
            skipped: vec![],
            disks: disks
                .iter()
                .enumerate()
                .map(|(slot, (disk, base))| PointDisk {
                    id: (*disk).into(),
                    slot: slot.to_string(),
                    size: 512,
                    stream: format!("disk{slot}.cbts"),
                    sha256: String::new(),
                    base: base.map(Into::into),
                })
                .collect(),
        };
        let files = info
            .disks
            .iter()
            .map(|d| ObjectInfo {
                key: format!("{}/{}", point_dir("vm", id), d.stream),
                size: 1,
            })
            .collect();
        StoredPoint { info, files }
    }

    /// Each disk's chain follows its own bases; a missing point names who needs it; a
    /// stream name that would leave the point's directory is refused.
    #[test]
    fn disk_links_follow_each_disks_bases() {
        let mut points = Points {
            points: vec![
                point("p1", None, &[("a", None)]),
                point("p2", Some("p1"), &[("a", Some("p1")), ("b", None)]),
                point("p3", Some("p2"), &[("a", Some("p2")), ("b", Some("p2"))]),
            ],
            incomplete: vec![],
        };
        let keys = |disk| -> Vec<String> {
            disk_links(&points, "vm", "p3", disk)
                .unwrap()
                .into_iter()
                .map(|l| l.key)
                .collect()
        };
        assert_eq!(
            keys("a"),
            [
                "vms/vm/points/p1/disk0.cbts",
                "vms/vm/points/p2/disk0.cbts",
                "vms/vm/points/p3/disk0.cbts"
            ]
        );
        assert_eq!(
            keys("b"),
            ["vms/vm/points/p2/disk1.cbts", "vms/vm/points/p3/disk1.cbts"]
        );
        assert_eq!(
            disk_links(&points, "vm", "p3", "c").unwrap_err(),
            "point p3 holds no stream of disk c"
        );
        points.points[1].info.disks[0].stream = "../x".into();
        assert!(disk_links(&points, "vm", "p3", "a")
            .unwrap_err()
            .contains("not a file name"));
        points.points[1].info.disks[0].stream = "disk0.cbts".into();
        points.points.remove(0);
        assert_eq!(
            disk_links(&points, "vm", "p3", "a").unwrap_err(),
            "disk a of point p2 needs point p1, which is not in the repository"
        );
        // Disk b does not need p1.
        assert_eq!(disk_links(&points, "vm", "p3", "b").unwrap().len(), 2);
    }

    /// Points of one second (SOURCE_DATE_EPOCH in the tests) still come after their base.
    #[test]
    fn points_of_the_same_time_sort_after_their_base() {
        let mut points = Points {
            points: vec![
                point("p1", Some("p3"), &[]),
                point("p3", None, &[]),
                point("p2", Some("p1"), &[]),
            ],
            incomplete: vec![],
        };
        for p in &mut points.points {
            p.info.time = "2026-11-30T00:00:00Z".into();
        }
        points.sort_oldest_first();
        let ids: Vec<&str> = points.points.iter().map(|p| p.info.id.as_str()).collect();
        assert_eq!(ids, ["p3", "p1", "p2"]);
    }

    #[test]
    fn a_loop_of_bases_is_refused() {
        let points = Points {
            points: vec![
                point("p1", Some("p2"), &[("a", Some("p2"))]),
                point("p2", Some("p1"), &[("a", Some("p1"))]),
            ],
            incomplete: vec![],
        };
        assert!(disk_links(&points, "vm", "p2", "a")
            .unwrap_err()
            .contains("loop"));
    }
}
