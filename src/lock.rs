//! One run at a time per chain: `export`, `commit` and `gc` hold an exclusive lock on
//! `STATE.lock` beside the state file while they work, so a cron overlap or a `gc` during an
//! export fails at once instead of racing on the same snapshots.
//!
//! The lock is `flock(2)` on a file that is never replaced (the state file itself is renamed
//! over on every save, so a lock on it would not outlive the first save). The kernel drops it
//! when the process dies, however it dies; the file keeps the holder's pid only to name it in
//! the error.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "another cbtstream run{} holds the lock {path}; try again when it has finished",
        holder.map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    Held { path: PathBuf, holder: Option<u32> },
    #[error("locking {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Held while alive; dropping it releases the lock.
#[derive(Debug)]
pub struct ChainLock {
    _file: File,
}

/// The lock file of a state file: `STATE.lock`.
pub fn lock_path(state: &Path) -> PathBuf {
    crate::durable::with_suffix(state, ".lock")
}

impl ChainLock {
    /// Take the chain's lock without waiting.
    pub fn acquire(state: &Path) -> Result<ChainLock, LockError> {
        ChainLock::acquire_file(lock_path(state))
    }

    /// Take the lock on `path` itself without waiting.
    pub fn acquire_file(path: PathBuf) -> Result<ChainLock, LockError> {
        let io = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        let file = crate::durable::private_options()
            .read(true)
            .open(&path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut text = String::new();
                let _ = (&file).take(32).read_to_string(&mut text);
                return Err(LockError::Held {
                    holder: text.trim().parse().ok(),
                    path,
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
        }
        // Ours now: record who holds it, in one write of a fixed width, so that a run
        // reading it meanwhile sees the old pid or the new one, never an empty file.
        let line = format!("{:<10}\n", std::process::id());
        (|| {
            file.write_all_at(line.as_bytes(), 0)?;
            file.set_len(line.len() as u64)
        })()
        .map_err(io)?;
        Ok(ChainLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_is_refused_with_the_first_ones_pid() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("chain.json");
        let first = ChainLock::acquire(&state).unwrap();
        // flock locks belong to the open file description: a second open in the same
        // process conflicts like another process would.
        match ChainLock::acquire(&state) {
            Err(LockError::Held { holder, path }) => {
                assert_eq!(holder, Some(std::process::id()));
                assert_eq!(path, lock_path(&state));
            }
            other => panic!("expected Held, got {other:?}"),
        }
        let msg = ChainLock::acquire(&state).unwrap_err().to_string();
        assert!(
            msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        drop(first);
        ChainLock::acquire(&state).unwrap();
    }
}
