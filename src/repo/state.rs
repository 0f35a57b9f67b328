//! Where a VM's chain state lives: a file (`--state`), or the repository
//! (`vms/<vm>/state.json`) when `--repo` is given without `--state`.

use super::{state_key, Repo};
use crate::chain::{self, ChainError, VmState};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub enum StateHome {
    File(PathBuf),
    Repo { repo: Repo, vm: String },
}

impl StateHome {
    pub async fn load(&self) -> Result<Option<VmState>, ChainError> {
        match self {
            StateHome::File(path) => chain::load_vm(path),
            StateHome::Repo { repo, vm } => {
                let key = state_key(vm);
                let name = PathBuf::from(repo.store.describe(&key));
                let text = repo
                    .store
                    .get(&key, chain::MAX_STATE_BYTES)
                    .await
                    .map_err(|e| ChainError::Read {
                        path: name.clone(),
                        source: std::io::Error::other(e),
                    })?;
                match text {
                    None => Ok(None),
                    Some(t) => {
                        let t = String::from_utf8(t).map_err(|_| ChainError::Damaged {
                            path: name.clone(),
                            why: "not UTF-8".into(),
                        })?;
                        chain::parse_vm(&t, &name).map(Some)
                    }
                }
            }
        }
    }

    pub async fn save(&self, state: &VmState) -> Result<(), ChainError> {
        match self {
            StateHome::File(path) => chain::save_vm(path, state),
            StateHome::Repo { repo, vm } => {
                let key = state_key(vm);
                repo.store
                    .put(&key, chain::vm_text(state).into_bytes())
                    .await
                    .map_err(|e| ChainError::Write {
                        path: Path::new(&repo.store.describe(&key)).to_path_buf(),
                        source: std::io::Error::other(e),
                    })
            }
        }
    }
}
