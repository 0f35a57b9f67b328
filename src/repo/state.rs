//! Where a VM's chain state lives: a file (`--state`), or the repository
//! (`vms/<vm>/state.json`) when `--repo` is given without `--state`. Its text is a
//! XenServer VM's [`VmState`] or a vSphere VM's [`VsphereState`] (`"source": "vsphere"`).

use super::{state_key, Repo};
use crate::chain::{self, ChainError, VmState, VsphereState};
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
            StateHome::Repo { repo, vm } => match load_text(repo, vm).await? {
                None => Ok(None),
                Some((text, name)) => chain::parse_vm(&text, &name).map(Some),
            },
        }
    }

    pub async fn save(&self, state: &VmState) -> Result<(), ChainError> {
        match self {
            StateHome::File(path) => chain::save_vm(path, state),
            StateHome::Repo { repo, vm } => save_text(repo, vm, chain::vm_text(state)).await,
        }
    }

    /// The chain of a vSphere VM (`backup --vsphere`), in the same places.
    pub async fn load_vsphere(&self) -> Result<Option<VsphereState>, ChainError> {
        match self {
            StateHome::File(path) => chain::load_vsphere(path),
            StateHome::Repo { repo, vm } => match load_text(repo, vm).await? {
                None => Ok(None),
                Some((text, name)) => chain::parse_vsphere(&text, &name).map(Some),
            },
        }
    }

    pub async fn save_vsphere(&self, state: &VsphereState) -> Result<(), ChainError> {
        match self {
            StateHome::File(path) => chain::save_vsphere(path, state),
            StateHome::Repo { repo, vm } => save_text(repo, vm, chain::vsphere_text(state)).await,
        }
    }
}

/// `vms/<vm>/state.json`'s text, and the name errors give it.
pub async fn load_text(repo: &Repo, vm: &str) -> Result<Option<(String, PathBuf)>, ChainError> {
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
    let Some(text) = text else {
        return Ok(None);
    };
    let text = String::from_utf8(text).map_err(|_| ChainError::Damaged {
        path: name.clone(),
        why: "not UTF-8".into(),
    })?;
    Ok(Some((text, name)))
}

async fn save_text(repo: &Repo, vm: &str, text: String) -> Result<(), ChainError> {
    let key = state_key(vm);
    repo.store
        .put(&key, text.into_bytes())
        .await
        .map_err(|e| ChainError::Write {
            path: Path::new(&repo.store.describe(&key)).to_path_buf(),
            source: std::io::Error::other(e),
        })
}
