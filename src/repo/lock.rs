//! One run at a time per VM in a repository: a backup and a prune of the same VM may not
//! overlap; backups of different VMs may.
//!
//! A local repository uses `flock(2)` on `vms/<vm>/lock` (the kernel drops it when the
//! holder dies, so it is never stale). S3 has no locks: the lock is the object
//! `vms/<vm>/lock.json`, created only if absent (`If-None-Match: *`), naming its owner and
//! an expiry that the holder pushes forward while it works. A lock whose owner ran on this
//! host and is no longer running is provably stale: it is reported (owner, age) and taken
//! over. A lock of another host whose expiry has passed may be stale, or its owner cut off
//! from the store: it is reported, and only `--break-lock` removes it. A lock that has not
//! expired is never broken.

use super::store::{Store, StoreError};
use super::Repo;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// How long a lock lives without being renewed.
const TTL: Duration = Duration::from_secs(10 * 60);
/// How often the holder renews it.
const RENEW_EVERY: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum RepoLockError {
    #[error("{what} is locked by {owner} ({operation}) since {age} s ago; try again when it has finished")]
    Held {
        what: String,
        owner: String,
        operation: String,
        age: u64,
    },
    #[error("{what} holds a stale lock of {owner} ({operation}, {age} s old, {why}); if no cbtstream run uses this VM any more, run again with --break-lock")]
    Stale {
        what: String,
        owner: String,
        operation: String,
        age: u64,
        why: String,
    },
    #[error(transparent)]
    Local(#[from] crate::lock::LockError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{what} is not a lock cbtstream wrote: {reason}")]
    Damaged { what: String, reason: String },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct LockRecord {
    host: String,
    pid: u32,
    operation: String,
    token: String,
    created_unix_secs: u64,
    expires_unix_secs: u64,
}

/// Held while alive; [`RepoLock::release`] removes an S3 lock (dropping it only stops the
/// renewals, and the lock expires).
pub struct RepoLock {
    inner: Held,
}

enum Held {
    Local(#[allow(dead_code)] crate::lock::ChainLock),
    S3 {
        store: Store,
        key: String,
        token: String,
        renew: tokio::task::JoinHandle<()>,
    },
}

impl Drop for RepoLock {
    fn drop(&mut self) {
        if let Held::S3 { renew, .. } = &self.inner {
            renew.abort();
        }
    }
}

fn now() -> u64 {
    crate::export::created_now()
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-host".into())
}

fn process_alive(pid: u32) -> bool {
    pid != 0 && std::path::Path::new(&format!("/proc/{pid}")).exists()
}

impl RepoLock {
    /// Takes the lock of `vm` for `operation` (`backup`, `prune`), without waiting.
    pub async fn acquire(
        repo: &Repo,
        vm: &str,
        operation: &str,
        break_lock: bool,
    ) -> Result<RepoLock, RepoLockError> {
        match &repo.store {
            Store::Local(root) => {
                let path = root.join(super::vm_dir(vm)).join("lock");
                super::store::create_parents(&path).map_err(|source| {
                    crate::lock::LockError::Io {
                        path: path.clone(),
                        source,
                    }
                })?;
                Ok(RepoLock {
                    inner: Held::Local(crate::lock::ChainLock::acquire_file(path)?),
                })
            }
            Store::S3 { .. } => acquire_s3(&repo.store, vm, operation, break_lock).await,
        }
    }

    /// Gives the lock back.
    pub async fn release(self) {
        if let Held::S3 {
            store, key, token, ..
        } = &self.inner
        {
            match read(store, key).await {
                Ok(Some(r)) if &r.token == token => {
                    if let Err(e) = store.delete(key).await {
                        tracing::warn!("could not remove the lock {}: {e}", store.describe(key));
                    }
                }
                _ => tracing::warn!("the lock {} is no longer ours", store.describe(key)),
            }
        }
    }
}

async fn read(store: &Store, key: &str) -> Result<Option<LockRecord>, RepoLockError> {
    let Some(text) = store.get(key, 64 << 10).await? else {
        return Ok(None);
    };
    serde_json::from_slice(&text)
        .map(Some)
        .map_err(|e| RepoLockError::Damaged {
            what: store.describe(key),
            reason: e.to_string(),
        })
}

async fn acquire_s3(
    store: &Store,
    vm: &str,
    operation: &str,
    break_lock: bool,
) -> Result<RepoLock, RepoLockError> {
    let key = format!("{}/lock.json", super::vm_dir(vm));
    let record = LockRecord {
        host: hostname(),
        pid: std::process::id(),
        operation: operation.to_owned(),
        token: uuid::Uuid::new_v4().to_string(),
        created_unix_secs: now(),
        expires_unix_secs: now() + TTL.as_secs(),
    };
    let text = serde_json::to_vec(&record).map_err(StoreError::from_json)?;
    for attempt in 0..2 {
        if store.put_new(&key, text.clone()).await? {
            let renew = tokio::spawn(renew(store.clone(), key.clone(), record.clone()));
            return Ok(RepoLock {
                inner: Held::S3 {
                    store: store.clone(),
                    key,
                    token: record.token,
                    renew,
                },
            });
        }
        let Some(held) = read(store, &key).await? else {
            continue; // released meanwhile
        };
        let owner = format!("{}:{}", held.host, held.pid);
        let age = now().saturating_sub(held.created_unix_secs);
        let dead = held.host == record.host && !process_alive(held.pid);
        let why = if dead {
            Some(format!("process {} is no longer running", held.pid))
        } else if now() > held.expires_unix_secs {
            Some(format!(
                "expired {} s ago",
                now().saturating_sub(held.expires_unix_secs)
            ))
        } else {
            None
        };
        let Some(why) = why else {
            return Err(RepoLockError::Held {
                what: format!("VM {vm} in the repository"),
                owner,
                operation: held.operation,
                age,
            });
        };
        if !(break_lock || dead) || attempt > 0 {
            return Err(RepoLockError::Stale {
                what: format!("VM {vm} in the repository"),
                owner,
                operation: held.operation,
                age,
                why,
            });
        }
        eprintln!(
            "cbtstream: warning: taking over the stale lock of VM {vm} held by {owner} ({}, {why}, {age} s old)",
            held.operation
        );
        store.delete(&key).await?;
    }
    unreachable!("the loop returns on its second attempt")
}

/// Pushes the expiry forward while the lock is held (and is still ours).
async fn renew(store: Store, key: String, mut record: LockRecord) {
    loop {
        tokio::time::sleep(RENEW_EVERY).await;
        match read(&store, &key).await {
            Ok(Some(r)) if r.token == record.token => {}
            _ => {
                tracing::warn!("the lock {} is no longer ours", store.describe(&key));
                return;
            }
        }
        record.expires_unix_secs = now() + TTL.as_secs();
        let Ok(text) = serde_json::to_vec(&record) else {
            return;
        };
        if let Err(e) = store.put(&key, text).await {
            tracing::warn!("could not renew the lock: {e}");
        }
    }
}
