//! Writing one point: into a point directory (`backup --out DIR`) or into a repository
//! (`backup --repo`). Either way the streams and the metadata come first and `point.json`
//! last: without it there is no point.

use super::upload::{self, Upload};
use super::{point_dir, uploads_dir, Repo, RepoError};
use crate::engine::sink::SharedFinishing;
use crate::export::Destination;
use crate::xen::point::{self, PartialPoint, PointInfo, POINT_FILE};

/// Where a backup's points go.
#[derive(Debug, Clone)]
pub enum PointTarget {
    Dir(std::path::PathBuf),
    Repo(Repo),
}

impl PointTarget {
    /// Whether point `id` of `vm` is stored there (its `point.json` exists).
    pub async fn has_point(&self, vm: &str, id: &str) -> Result<bool, PointWriteError> {
        match self {
            PointTarget::Dir(out) => {
                let path = out.join(id).join(POINT_FILE);
                path.try_exists().map_err(|source| PointWriteError::Io {
                    what: format!("looking for {}", path.display()),
                    source,
                })
            }
            PointTarget::Repo(repo) => {
                let key = format!("{}/{POINT_FILE}", point_dir(vm, id));
                Ok(repo.store.size(&key).await?.is_some())
            }
        }
    }

    pub fn describe(&self) -> String {
        match self {
            PointTarget::Dir(out) => out.display().to_string(),
            PointTarget::Repo(repo) => format!("the repository {}", repo.store.describe("")),
        }
    }
}

/// Whether the chain's last point, which an incremental would build on, is in `target`.
/// When it is not (pruned while the chain state was kept elsewhere, deleted by hand, or
/// another destination), an incremental there could never be restored: the caller makes a
/// full one instead, and says so.
pub async fn base_point_present(
    target: &PointTarget,
    vm: &str,
    point: Option<&str>,
) -> Result<bool, PointWriteError> {
    let Some(point) = point else {
        return Ok(true);
    };
    let present = target.has_point(vm, point).await?;
    if !present {
        tracing::warn!(
            "the chain's last point {point} is not in {}: an incremental on it could not be \
             restored from there, so this backup is a full one",
            target.describe()
        );
    }
    Ok(present)
}

#[derive(Debug, thiserror::Error)]
pub enum PointWriteError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Repo(#[from] RepoError),
}

impl From<super::store::StoreError> for PointWriteError {
    fn from(e: super::store::StoreError) -> Self {
        PointWriteError::Repo(RepoError::Store(e))
    }
}

/// A point being written. Dropped or [`PointWriter::discard`]ed before
/// [`PointWriter::finish`], it leaves no point (a repository's leftovers, if the process
/// dies first, go with the next backup or prune of the VM).
pub enum PointWriter {
    Dir(PartialPoint),
    Repo {
        repo: Repo,
        vm: String,
        id: String,
        uploads: Vec<(String, Upload)>,
        stored: Vec<(String, String)>,
    },
}

impl PointWriter {
    pub async fn create(
        target: &PointTarget,
        vm: &str,
        id: &str,
    ) -> Result<PointWriter, PointWriteError> {
        match target {
            PointTarget::Dir(out) => {
                PartialPoint::create(out, id)
                    .map(PointWriter::Dir)
                    .map_err(|source| PointWriteError::Io {
                        what: format!("creating the point directory in {}", out.display()),
                        source,
                    })
            }
            PointTarget::Repo(repo) => {
                let key = format!("{}/{POINT_FILE}", point_dir(vm, id));
                if repo.store.size(&key).await?.is_some() {
                    return Err(PointWriteError::Io {
                        what: repo.store.describe(&key),
                        source: std::io::ErrorKind::AlreadyExists.into(),
                    });
                }
                Ok(PointWriter::Repo {
                    repo: repo.clone(),
                    vm: vm.to_owned(),
                    id: id.to_owned(),
                    uploads: Vec::new(),
                    stored: Vec::new(),
                })
            }
        }
    }

    /// Where the stream `name` (about `expected` bytes at most) goes.
    pub async fn stream(
        &mut self,
        name: &str,
        expected: u64,
    ) -> Result<Destination, PointWriteError> {
        match self {
            PointWriter::Dir(p) => Ok(Destination::Output(p.file(name))),
            PointWriter::Repo {
                repo,
                vm,
                id,
                uploads,
                ..
            } => {
                let key = format!("{}/{name}", point_dir(vm, id));
                let (up, writer) =
                    upload::start(&repo.store, &key, expected, &uploads_dir(vm)).await?;
                uploads.push((name.to_owned(), up));
                Ok(Destination::Upload(SharedFinishing::new(Box::new(writer))))
            }
        }
    }

    /// A small file of the point, written whole.
    pub async fn put(&mut self, name: &str, data: Vec<u8>) -> Result<(), PointWriteError> {
        match self {
            PointWriter::Dir(p) => {
                let path = p.file(name);
                crate::durable::replace(&path, &data).map_err(|source| PointWriteError::Io {
                    what: format!("writing {}", path.display()),
                    source,
                })
            }
            PointWriter::Repo { repo, vm, id, .. } => {
                let key = format!("{}/{name}", point_dir(vm, id));
                repo.store.put(&key, data).await?;
                Ok(())
            }
        }
    }

    /// The SHA-256 of stream `name`, once it is stored whole.
    pub async fn sha256(&mut self, name: &str) -> Result<String, PointWriteError> {
        match self {
            PointWriter::Dir(p) => {
                let path = p.file(name);
                let what = format!("reading back {}", path.display());
                tokio::task::spawn_blocking(move || point::sha256_file(&path))
                    .await
                    .map_err(std::io::Error::other)
                    .and_then(|r| r)
                    .map_err(|source| PointWriteError::Io { what, source })
            }
            PointWriter::Repo {
                uploads, stored, ..
            } => {
                if let Some(i) = uploads.iter().position(|(n, _)| n == name) {
                    let (n, up) = uploads.swap_remove(i);
                    let s = up.finish().await?;
                    stored.push((n, s.sha256));
                }
                stored
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, sha)| sha.clone())
                    .ok_or_else(|| PointWriteError::Io {
                        what: format!("stream {name}"),
                        source: std::io::ErrorKind::NotFound.into(),
                    })
            }
        }
    }

    /// Writes point.json last; the point exists from then on. Returns where it is.
    pub async fn finish(self, info: &PointInfo) -> Result<String, PointWriteError> {
        match self {
            PointWriter::Dir(p) => {
                p.finish(info)
                    .map(|d| d.display().to_string())
                    .map_err(|source| PointWriteError::Io {
                        what: "finishing the point directory".into(),
                        source,
                    })
            }
            PointWriter::Repo {
                repo,
                vm,
                id,
                uploads,
                ..
            } => {
                if !uploads.is_empty() {
                    return Err(PointWriteError::Io {
                        what: "finishing the point".into(),
                        source: std::io::Error::other("a stream was not checked"),
                    });
                }
                let mut text = serde_json::to_vec_pretty(info)
                    .map_err(std::io::Error::other)
                    .map_err(|source| PointWriteError::Io {
                        what: "point.json".into(),
                        source,
                    })?;
                text.push(b'\n');
                let key = format!("{}/{POINT_FILE}", point_dir(&vm, &id));
                repo.store.put(&key, text).await?;
                Ok(repo.store.describe(&point_dir(&vm, &id)))
            }
        }
    }

    /// Gives up: waits for the uploads to be aborted and removes what was stored.
    pub async fn discard(self) {
        if let PointWriter::Repo {
            repo,
            vm,
            id,
            uploads,
            ..
        } = self
        {
            for (_, up) in uploads {
                let _ = up.finish().await;
            }
            remove_objects(&repo, &point_dir(&vm, &id)).await;
        }
    }
}

/// Removes every object under `dir` (best effort: what stays is removed by the next run).
pub async fn remove_objects(repo: &Repo, dir: &str) {
    match repo.store.list(dir).await {
        Ok(objects) => {
            for o in objects {
                if let Err(e) = repo.store.delete(&o.key).await {
                    tracing::warn!("could not remove {}: {e}", repo.store.describe(&o.key));
                }
            }
        }
        Err(e) => tracing::warn!("could not list {}: {e}", repo.store.describe(dir)),
    }
}
