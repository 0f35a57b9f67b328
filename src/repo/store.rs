//! The objects of a repository, on a local directory or on S3: small objects read and
//! written whole (point.json, the chain state, locks), streams written as they are produced
//! ([`super::upload`]) and read back with range requests ([`super::reader`]).
//!
//! Keys are `/`-separated and relative to the repository's root. A local repository makes
//! every file 0600 and fsyncs what it writes; on S3 a PUT is durable when it returns.

use bytes::Bytes;
use futures_util::TryStreamExt;
use object_store::aws::AmazonS3;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    S3 {
        what: String,
        source: object_store::Error,
    },
    #[error("{what} is larger than {limit} bytes: not one of cbtstream's")]
    TooLarge { what: String, limit: u64 },
    #[error("{what}: {reason}")]
    Invalid { what: String, reason: String },
}

impl StoreError {
    pub fn invalid(what: impl Into<String>, reason: impl Into<String>) -> StoreError {
        StoreError::Invalid {
            what: what.into(),
            reason: reason.into(),
        }
    }
}

/// One object found by [`Store::list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Its key, relative to the repository's root.
    pub key: String,
    pub size: u64,
}

/// A repository's objects.
#[derive(Debug, Clone)]
pub enum Store {
    Local(PathBuf),
    S3 {
        store: Arc<AmazonS3>,
        /// The location's prefix, with a trailing `/` unless empty.
        prefix: String,
        /// `s3://bucket/prefix/`, for messages.
        url: String,
    },
}

/// A component of a key: what the repository itself names things with (uuids, ids, file
/// names), never `.`/`..`, a separator or a control character. Names read from a listing
/// pass through this too: a stray object cannot lead a path elsewhere.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn check_key(key: &str) -> Result<(), StoreError> {
    if key.split('/').all(valid_name) {
        Ok(())
    } else {
        Err(StoreError::invalid(key, "not a valid repository key"))
    }
}

impl Store {
    /// How a key is named in messages: its path, or its `s3://` URL.
    pub fn describe(&self, key: &str) -> String {
        match self {
            Store::Local(root) => root.join(key).display().to_string(),
            Store::S3 { url, .. } => format!("{url}{key}"),
        }
    }

    fn local_path(root: &std::path::Path, key: &str) -> Result<PathBuf, StoreError> {
        check_key(key)?;
        Ok(root.join(key))
    }

    pub(super) fn s3_path(prefix: &str, key: &str) -> Result<ObjectPath, StoreError> {
        check_key(key)?;
        ObjectPath::parse(format!("{prefix}{key}"))
            .map_err(|e| StoreError::invalid(key, e.to_string()))
    }

    fn s3_error(&self, key: &str, source: object_store::Error) -> StoreError {
        StoreError::S3 {
            what: self.describe(key),
            source,
        }
    }

    fn io_error(&self, key: &str, source: std::io::Error) -> StoreError {
        StoreError::Io {
            what: self.describe(key),
            source,
        }
    }

    /// A whole small object, or `None` when there is none; refused past `limit` bytes.
    pub async fn get(&self, key: &str, limit: u64) -> Result<Option<Vec<u8>>, StoreError> {
        let too_large = || StoreError::TooLarge {
            what: self.describe(key),
            limit,
        };
        match self {
            Store::Local(root) => {
                let path = Self::local_path(root, key)?;
                let read = tokio::task::spawn_blocking(move || {
                    use std::io::Read;
                    let f = match std::fs::File::open(&path) {
                        Ok(f) => f,
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                        Err(e) => return Err(e),
                    };
                    let mut data = Vec::new();
                    f.take(limit + 1).read_to_end(&mut data)?;
                    Ok(Some(data))
                })
                .await
                .map_err(|e| self.io_error(key, std::io::Error::other(e)))?;
                match read.map_err(|e| self.io_error(key, e))? {
                    Some(d) if d.len() as u64 > limit => Err(too_large()),
                    other => Ok(other),
                }
            }
            Store::S3 { store, prefix, .. } => {
                let path = Self::s3_path(prefix, key)?;
                let got = match store.get(&path).await {
                    Ok(g) => g,
                    Err(object_store::Error::NotFound { .. }) => return Ok(None),
                    Err(e) => return Err(self.s3_error(key, e)),
                };
                if got.meta.size > limit {
                    return Err(too_large());
                }
                let mut data = Vec::with_capacity(got.meta.size as usize);
                let mut body = got.into_stream();
                while let Some(chunk) = body.try_next().await.map_err(|e| self.s3_error(key, e))? {
                    if (data.len() + chunk.len()) as u64 > limit {
                        return Err(too_large());
                    }
                    data.extend_from_slice(&chunk);
                }
                Ok(Some(data))
            }
        }
    }

    /// Bytes `range` of an object.
    pub async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, StoreError> {
        match self {
            Store::Local(root) => {
                let path = Self::local_path(root, key)?;
                let r = range.clone();
                tokio::task::spawn_blocking(move || {
                    use std::os::unix::fs::FileExt;
                    let f = std::fs::File::open(path)?;
                    let mut buf = vec![0; (r.end - r.start) as usize];
                    f.read_exact_at(&mut buf, r.start)?;
                    Ok(Bytes::from(buf))
                })
                .await
                .map_err(|e| self.io_error(key, std::io::Error::other(e)))?
                .map_err(|e| self.io_error(key, e))
            }
            Store::S3 { store, prefix, .. } => {
                let path = Self::s3_path(prefix, key)?;
                let got = store
                    .get_range(&path, range.clone())
                    .await
                    .map_err(|e| self.s3_error(key, e))?;
                if got.len() as u64 != range.end - range.start {
                    return Err(StoreError::invalid(
                        self.describe(key),
                        format!(
                            "asked for {} bytes at {}, got {}",
                            range.end - range.start,
                            range.start,
                            got.len()
                        ),
                    ));
                }
                Ok(got)
            }
        }
    }

    /// An object's size, or `None` when there is none.
    pub async fn size(&self, key: &str) -> Result<Option<u64>, StoreError> {
        match self {
            Store::Local(root) => match std::fs::metadata(Self::local_path(root, key)?) {
                Ok(m) if m.is_file() => Ok(Some(m.len())),
                Ok(_) => Ok(None),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(self.io_error(key, e)),
            },
            Store::S3 { store, prefix, .. } => {
                match store.head(&Self::s3_path(prefix, key)?).await {
                    Ok(m) => Ok(Some(m.size)),
                    Err(object_store::Error::NotFound { .. }) => Ok(None),
                    Err(e) => Err(self.s3_error(key, e)),
                }
            }
        }
    }

    /// Every object whose key starts with `dir/`, sorted by key. Objects with names the
    /// repository would never write are skipped (and logged).
    pub async fn list(&self, dir: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        check_key(dir)?;
        let mut found = match self {
            Store::Local(root) => {
                let start = root.join(dir);
                let root = root.clone();
                tokio::task::spawn_blocking(move || list_local(&root, &start))
                    .await
                    .map_err(|e| self.io_error(dir, std::io::Error::other(e)))?
                    .map_err(|e| self.io_error(dir, e))?
            }
            Store::S3 { store, prefix, .. } => {
                let path = ObjectPath::parse(format!("{prefix}{dir}"))
                    .map_err(|e| StoreError::invalid(dir, e.to_string()))?;
                let metas: Vec<_> = store
                    .list(Some(&path))
                    .try_collect()
                    .await
                    .map_err(|e| self.s3_error(dir, e))?;
                metas
                    .into_iter()
                    .filter_map(|m| {
                        let full = m.location.to_string();
                        let key = full.strip_prefix(prefix.as_str())?.to_owned();
                        Some(ObjectInfo { key, size: m.size })
                    })
                    .collect()
            }
        };
        found.retain(|o| {
            let ok = check_key(&o.key).is_ok();
            if !ok {
                tracing::warn!(
                    "ignoring {}: not a name cbtstream writes",
                    self.describe(&o.key)
                );
            }
            ok
        });
        found.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(found)
    }

    /// Writes a small object whole, replacing any (atomically, durably).
    pub async fn put(&self, key: &str, data: Vec<u8>) -> Result<(), StoreError> {
        match self {
            Store::Local(root) => {
                let path = Self::local_path(root, key)?;
                tokio::task::spawn_blocking(move || {
                    create_parents(&path)?;
                    crate::durable::replace(&path, &data)
                })
                .await
                .map_err(|e| self.io_error(key, std::io::Error::other(e)))?
                .map_err(|e| self.io_error(key, e))
            }
            Store::S3 { store, prefix, .. } => {
                let path = Self::s3_path(prefix, key)?;
                store
                    .put(&path, PutPayload::from(data))
                    .await
                    .map(|_| ())
                    .map_err(|e| self.s3_error(key, e))
            }
        }
    }

    /// Writes a small object only if there is none: `Ok(false)` when one exists.
    pub async fn put_new(&self, key: &str, data: Vec<u8>) -> Result<bool, StoreError> {
        match self {
            Store::Local(root) => {
                let path = Self::local_path(root, key)?;
                tokio::task::spawn_blocking(move || {
                    use std::io::Write;
                    create_parents(&path)?;
                    let mut f = match crate::durable::private_options()
                        .write(true)
                        .create_new(true)
                        .open(&path)
                    {
                        Ok(f) => f,
                        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                            return Ok(false)
                        }
                        Err(e) => return Err(e),
                    };
                    f.write_all(&data)?;
                    f.sync_all()?;
                    crate::durable::sync_parent_dir(&path)?;
                    Ok(true)
                })
                .await
                .map_err(|e| self.io_error(key, std::io::Error::other(e)))?
                .map_err(|e| self.io_error(key, e))
            }
            Store::S3 { store, prefix, .. } => {
                let path = Self::s3_path(prefix, key)?;
                let opts = PutOptions {
                    mode: PutMode::Create,
                    ..Default::default()
                };
                match store.put_opts(&path, PutPayload::from(data), opts).await {
                    Ok(_) => Ok(true),
                    Err(object_store::Error::AlreadyExists { .. })
                    | Err(object_store::Error::Precondition { .. }) => Ok(false),
                    Err(e) => Err(self.s3_error(key, e)),
                }
            }
        }
    }

    /// Deletes an object; one that is not there is not an error.
    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        match self {
            Store::Local(root) => {
                let path = Self::local_path(root, key)?;
                match std::fs::remove_file(&path) {
                    Ok(()) => {
                        // Empty directories are not objects: remove them up to the root.
                        let mut dir = path.parent();
                        while let Some(d) = dir {
                            if d == root.as_path() || std::fs::remove_dir(d).is_err() {
                                break;
                            }
                            dir = d.parent();
                        }
                        crate::durable::sync_parent_dir(&path).or_else(|e| {
                            if e.kind() == std::io::ErrorKind::NotFound {
                                Ok(())
                            } else {
                                Err(e)
                            }
                        })
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    Err(e) => Err(e),
                }
                .map_err(|e| self.io_error(key, e))
            }
            Store::S3 { store, prefix, .. } => {
                match store.delete(&Self::s3_path(prefix, key)?).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                    Err(e) => Err(self.s3_error(key, e)),
                }
            }
        }
    }
}

/// Creates the directories above a file (0700).
pub fn create_parents(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match path.parent() {
        Some(dir) => std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir),
        None => Ok(()),
    }
}

fn list_local(root: &std::path::Path, start: &std::path::Path) -> std::io::Result<Vec<ObjectInfo>> {
    let mut found = Vec::new();
    let mut dirs = vec![start.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                dirs.push(entry.path());
            } else if kind.is_file() {
                let path = entry.path();
                let Ok(rel) = path.strip_prefix(root) else {
                    continue;
                };
                let Some(key) = rel.to_str() else {
                    continue;
                };
                found.push(ObjectInfo {
                    key: key.to_owned(),
                    size: entry.metadata()?.len(),
                });
            }
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_local_store_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::Local(dir.path().to_path_buf());
        assert_eq!(s.get("a/b.json", 10).await.unwrap(), None);
        s.put("a/b.json", b"hello".to_vec()).await.unwrap();
        assert_eq!(s.get("a/b.json", 10).await.unwrap().unwrap(), b"hello");
        assert!(matches!(
            s.get("a/b.json", 4).await,
            Err(StoreError::TooLarge { .. })
        ));
        assert_eq!(&s.get_range("a/b.json", 1..3).await.unwrap()[..], b"el");
        assert!(s.put_new("a/c", b"1".to_vec()).await.unwrap());
        assert!(!s.put_new("a/c", b"2".to_vec()).await.unwrap());
        assert_eq!(s.size("a/c").await.unwrap(), Some(1));
        let listed = s.list("a").await.unwrap();
        assert_eq!(
            listed.iter().map(|o| o.key.as_str()).collect::<Vec<_>>(),
            ["a/b.json", "a/c"]
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("a/c"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        s.delete("a/b.json").await.unwrap();
        s.delete("a/c").await.unwrap();
        s.delete("a/c").await.unwrap();
        assert!(!dir.path().join("a").exists());
        assert!(s.get("../x", 10).await.is_err());
        assert!(s.put("a//b", vec![]).await.is_err());
    }
}
