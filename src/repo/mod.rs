//! The repository: whole-VM points kept on a local directory or on S3, listed, restored,
//! pruned into synthetic fulls and verified. The layout (docs/FORMAT.md, "Repositories"):
//!
//! ```text
//! config.json                                  the format version
//! vms/<vm>/points/<point>/point.json           written last: without it, no point
//! vms/<vm>/points/<point>/metadata.xva, disk<slot>.cbts, ...
//! vms/<vm>/state.json                          the chain state, unless --state is given
//! vms/<vm>/lock.json                           who holds the VM (backup, prune)
//! vms/<vm>/uploads/<id>.json                   S3 uploads in progress
//! ```

// Parts used by the commands still being wired (restore, prune, verify).
#![allow(dead_code)]

pub mod list;
pub mod location;
pub mod lock;
pub mod point_writer;
pub mod prune;
pub mod reader;
pub mod restore;
pub mod retention;
pub mod state;
pub mod store;
pub mod upload;
pub mod verify;

use crate::xen::point::{PointInfo, POINT_FILE};
use location::{Location, LocationError};
use object_store::aws::AmazonS3Builder;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use store::{ObjectInfo, Store, StoreError};

/// `config.json`'s `format`.
const FORMAT: &str = "cbtstream-repository";
const VERSION: u32 = 1;
const CONFIG: &str = "config.json";
/// point.json lists a few disks; anything this large is not one of ours.
pub const POINT_LIMIT: u64 = 1 << 20;

/// Where the repository is and how to reach it, as the CLI gathered it.
#[derive(Debug, Clone)]
pub struct RepoOptions {
    pub location: String,
    /// `--s3-endpoint`: an S3-compatible store (path-style requests).
    pub s3_endpoint: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error(transparent)]
    Location(#[from] LocationError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "{0} is not a cbtstream repository (no config.json): create one with `cbtstream repo init`"
    )]
    NotARepository(String),
    #[error("{0} is a repository already")]
    Exists(String),
    #[error("{what}: {reason}")]
    Damaged { what: String, reason: String },
    #[error("S3 settings: {0}")]
    S3Settings(String),
}

#[derive(Debug, Serialize, Deserialize)]
struct Config {
    format: String,
    version: u32,
    created: String,
}

/// An open repository.
#[derive(Debug, Clone)]
pub struct Repo {
    pub store: Store,
    pub location: Location,
}

/// A point found in the repository.
#[derive(Debug, Clone)]
pub struct StoredPoint {
    pub info: PointInfo,
    /// The objects under its directory (point.json included).
    pub files: Vec<ObjectInfo>,
}

impl StoredPoint {
    /// Bytes stored for the point.
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

pub fn vm_dir(vm: &str) -> String {
    format!("vms/{vm}")
}

pub fn points_dir(vm: &str) -> String {
    format!("vms/{vm}/points")
}

pub fn point_dir(vm: &str, point: &str) -> String {
    format!("vms/{vm}/points/{point}")
}

pub fn uploads_dir(vm: &str) -> String {
    format!("vms/{vm}/uploads")
}

pub fn state_key(vm: &str) -> String {
    format!("vms/{vm}/state.json")
}

impl Repo {
    fn connect(opts: &RepoOptions) -> Result<Repo, RepoError> {
        let location = Location::parse(&opts.location)?;
        let store = match &location {
            Location::Dir(path) => {
                if opts.s3_endpoint.is_some() {
                    return Err(RepoError::S3Settings(
                        "--s3-endpoint is for s3:// locations".into(),
                    ));
                }
                Store::Local(path.clone())
            }
            Location::S3 { bucket, prefix } => {
                let s3 = s3_client(bucket, opts.s3_endpoint.as_deref())?;
                Store::S3 {
                    store: Arc::new(s3),
                    prefix: if prefix.is_empty() {
                        String::new()
                    } else {
                        format!("{prefix}/")
                    },
                    url: format!("{location}/"),
                }
            }
        };
        Ok(Repo { store, location })
    }

    /// `cbtstream repo init`: a new repository (a directory is created 0700 if missing).
    pub async fn init(opts: &RepoOptions) -> Result<Repo, RepoError> {
        let repo = Repo::connect(opts)?;
        let config = Config {
            format: FORMAT.into(),
            version: VERSION,
            created: crate::restore::report::rfc3339(crate::export::created_now()),
        };
        let mut text = serde_json::to_vec_pretty(&config).map_err(StoreError::from_json)?;
        text.push(b'\n');
        if !repo.store.put_new(CONFIG, text).await? {
            return Err(RepoError::Exists(repo.location.to_string()));
        }
        Ok(repo)
    }

    /// An existing repository, its format version checked.
    pub async fn open(opts: &RepoOptions) -> Result<Repo, RepoError> {
        let repo = Repo::connect(opts)?;
        let Some(text) = repo.store.get(CONFIG, 64 << 10).await? else {
            return Err(RepoError::NotARepository(repo.location.to_string()));
        };
        let config: Config = serde_json::from_slice(&text).map_err(|e| RepoError::Damaged {
            what: repo.store.describe(CONFIG),
            reason: e.to_string(),
        })?;
        if config.format != FORMAT || config.version != VERSION {
            return Err(RepoError::Damaged {
                what: repo.store.describe(CONFIG),
                reason: format!(
                    "format {:?} version {}: this cbtstream reads {FORMAT} version {VERSION}",
                    config.format, config.version
                ),
            });
        }
        Ok(repo)
    }

    /// The VMs with a directory in the repository.
    pub async fn vms(&self) -> Result<Vec<String>, RepoError> {
        let mut vms: Vec<String> = self
            .store
            .list("vms")
            .await?
            .into_iter()
            .filter_map(|o| o.key.split('/').nth(1).map(str::to_owned))
            .collect();
        vms.dedup();
        Ok(vms)
    }

    /// Every point of `vm` (those with a point.json), oldest first; the objects of
    /// directories without one (a backup or prune that did not finish) in `incomplete`.
    pub async fn points(&self, vm: &str) -> Result<Points, RepoError> {
        let objects = self.store.list(&points_dir(vm)).await?;
        let mut by_dir: std::collections::BTreeMap<String, Vec<ObjectInfo>> = Default::default();
        for o in objects {
            // vms/<vm>/points/<point>/<file>
            let parts: Vec<&str> = o.key.split('/').collect();
            if parts.len() != 5 {
                continue;
            }
            by_dir.entry(parts[3].to_owned()).or_default().push(o);
        }
        let mut points = Points::default();
        for (id, files) in by_dir {
            if !files
                .iter()
                .any(|f| f.key.ends_with(&format!("/{POINT_FILE}")))
            {
                points.incomplete.extend(files);
                continue;
            }
            let key = format!("{}/{POINT_FILE}", point_dir(vm, &id));
            let Some(text) = self.store.get(&key, POINT_LIMIT).await? else {
                points.incomplete.extend(files);
                continue;
            };
            let info: PointInfo =
                serde_json::from_slice(&text).map_err(|e| RepoError::Damaged {
                    what: self.store.describe(&key),
                    reason: e.to_string(),
                })?;
            if info.id != id || info.vm != vm {
                return Err(RepoError::Damaged {
                    what: self.store.describe(&key),
                    reason: format!("it names point {} of VM {}", info.id, info.vm),
                });
            }
            points.points.push(StoredPoint { info, files });
        }
        points.sort_oldest_first();
        Ok(points)
    }
}

/// What [`Repo::points`] found.
#[derive(Debug, Default)]
pub struct Points {
    pub points: Vec<StoredPoint>,
    pub incomplete: Vec<ObjectInfo>,
}

impl Points {
    /// Oldest first; points with the same time (the clock's resolution is a second) in
    /// chain order: a point after the points it builds on.
    pub fn sort_oldest_first(&mut self) {
        let depth: std::collections::BTreeMap<String, usize> = self
            .points
            .iter()
            .map(|p| (p.info.id.clone(), self.depth(&p.info.id)))
            .collect();
        self.points.sort_by(|a, b| {
            (&a.info.time, depth[&a.info.id], &a.info.id).cmp(&(
                &b.info.time,
                depth[&b.info.id],
                &b.info.id,
            ))
        });
    }

    /// How many points `id` builds on (those in the repository).
    fn depth(&self, id: &str) -> usize {
        let mut depth = 0;
        let mut next = self.get(id).and_then(|p| p.info.base.clone());
        while let Some(base) = next {
            if depth > self.points.len() {
                break; // a loop: verify reports it
            }
            depth += 1;
            next = self.get(&base).and_then(|p| p.info.base.clone());
        }
        depth
    }

    pub fn get(&self, id: &str) -> Option<&StoredPoint> {
        self.points.iter().find(|p| p.info.id == id)
    }

    /// The points `id` needs, oldest first, ending with `id`: for each disk, the chain of
    /// streams from its full one. Fails naming what is missing.
    pub fn chain(&self, id: &str) -> Result<Vec<&StoredPoint>, String> {
        let mut chain: Vec<&StoredPoint> = Vec::new();
        let mut next = Some(id.to_owned());
        while let Some(id) = next {
            let Some(p) = self.get(&id) else {
                return Err(match chain.last() {
                    None => format!("there is no point {id}"),
                    Some(after) => format!(
                        "point {} needs point {id}, which is not in the repository",
                        after.info.id
                    ),
                });
            };
            if chain.len() > self.points.len() {
                return Err(format!("the points' bases form a loop at {id}"));
            }
            next = p.info.base.clone();
            chain.push(p);
        }
        chain.reverse();
        Ok(chain)
    }

    /// The streams restoring disk `disk_id` to point `id`: (point, stream key), oldest first.
    pub fn disk_chain(&self, vm: &str, id: &str, disk_id: &str) -> Result<Vec<String>, String> {
        let mut keys = Vec::new();
        let mut next = Some(id.to_owned());
        while let Some(pid) = next {
            let p = self
                .get(&pid)
                .ok_or_else(|| format!("point {pid} is not in the repository"))?;
            let d = p
                .info
                .disks
                .iter()
                .find(|d| d.id == disk_id)
                .ok_or_else(|| format!("point {pid} holds no stream of disk {disk_id}"))?;
            keys.push(format!("{}/{}", point_dir(vm, &pid), d.stream));
            if keys.len() > self.points.len() {
                return Err(format!("the bases of disk {disk_id} form a loop"));
            }
            next = d.base.clone();
        }
        keys.reverse();
        Ok(keys)
    }
}

impl StoreError {
    pub fn from_json(e: serde_json::Error) -> StoreError {
        StoreError::invalid("JSON", e.to_string())
    }
}

/// An S3 client for `bucket`: credentials and region from the AWS environment variables,
/// else from the shared files (`~/.aws/credentials`, `~/.aws/config`, profile
/// `$AWS_PROFILE` or `default`); path-style requests; plain HTTP only to a loopback endpoint.
fn s3_client(
    bucket: &str,
    endpoint: Option<&str>,
) -> Result<object_store::aws::AmazonS3, RepoError> {
    let mut b = AmazonS3Builder::from_env()
        .with_bucket_name(bucket)
        .with_virtual_hosted_style_request(false);
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let endpoint = endpoint
        .map(str::to_owned)
        .or_else(|| env("AWS_ENDPOINT_URL_S3"))
        .or_else(|| env("AWS_ENDPOINT_URL"));
    let mut client = object_store::ClientOptions::new()
        .with_connect_timeout(std::time::Duration::from_secs(10))
        .with_timeout(std::time::Duration::from_secs(300));
    if let Some(url) = &endpoint {
        location::check_endpoint(url)?;
        b = b.with_endpoint(url);
        // (with_client_options replaces every client option: allow_http goes in them.)
        client = client.with_allow_http(url.starts_with("http://"));
    }
    if env("AWS_ACCESS_KEY_ID").is_none() {
        let profile = env("AWS_PROFILE").unwrap_or_else(|| "default".into());
        let home = env("HOME").unwrap_or_default();
        let creds_file = env("AWS_SHARED_CREDENTIALS_FILE")
            .unwrap_or_else(|| format!("{home}/.aws/credentials"));
        let creds = read_aws_file(&creds_file, &profile)?;
        if let (Some(id), Some(secret)) = (
            creds.get("aws_access_key_id"),
            creds.get("aws_secret_access_key"),
        ) {
            b = b.with_access_key_id(id).with_secret_access_key(secret);
            if let Some(token) = creds.get("aws_session_token") {
                b = b.with_token(token);
            }
        }
    }
    if env("AWS_REGION").is_none() && env("AWS_DEFAULT_REGION").is_none() {
        let profile = env("AWS_PROFILE").unwrap_or_else(|| "default".into());
        let home = env("HOME").unwrap_or_default();
        let config_file = env("AWS_CONFIG_FILE").unwrap_or_else(|| format!("{home}/.aws/config"));
        let section = if profile == "default" {
            profile
        } else {
            format!("profile {profile}")
        };
        let region = read_aws_file(&config_file, &section)?
            .remove("region")
            .unwrap_or_else(|| "us-east-1".into());
        b = b.with_region(region);
    }
    b = b.with_client_options(client);
    b = b.with_retry(object_store::RetryConfig {
        max_retries: 4,
        retry_timeout: std::time::Duration::from_secs(60),
        ..Default::default()
    });
    b.build().map_err(|e| RepoError::S3Settings(e.to_string()))
}

/// One section of an AWS shared file; a missing file is an empty one.
fn read_aws_file(
    path: &str,
    section: &str,
) -> Result<std::collections::BTreeMap<String, String>, RepoError> {
    use std::io::Read;
    let mut text = String::new();
    match std::fs::File::open(path) {
        Ok(f) => {
            f.take(1 << 20)
                .read_to_string(&mut text)
                .map_err(|e| RepoError::S3Settings(format!("reading {path}: {e}")))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(RepoError::S3Settings(format!("reading {path}: {e}"))),
    }
    Ok(cbtstream_proto::aws_config::section(&text, section))
}

/// Clears what runs on `vm` that did not finish left behind: S3 uploads never completed nor
/// aborted, and point directories without point.json. Only under the VM's lock.
pub async fn clean_leftovers(repo: &Repo, vm: &str) -> Result<(), RepoError> {
    upload::abort_journaled(&repo.store, &uploads_dir(vm)).await?;
    let found = repo.points(vm).await?;
    for o in &found.incomplete {
        tracing::info!(
            "removing {}, left by a run that did not finish",
            repo.store.describe(&o.key)
        );
        repo.store.delete(&o.key).await?;
    }
    Ok(())
}
