//! The VMware vSphere source: changed-block tracking through the VI/JSON API (vCenter
//! 8.0U1+), on the same engine, stream format and point directories as XenServer.
//!
//! ```text
//! login → find the VM → check its disks and snapshots → CreateSnapshotEx_Task
//!       → per disk: QueryChangedDiskAreas, paged, from the chain's changeId ("*" for a full)
//!       → read the frozen flat extents (data.rs) → point.json / the stream, durable
//!       → the chain state records each disk's new changeId → RemoveSnapshot_Task → Logout
//! ```
//!
//! * [`client`]: HTTPS with the trust rules of [`crate::tls`], the session header, faults,
//!   re-login on `NotAuthenticated`, bounded bodies, task polling.
//! * [`calls`]: the typed calls (inventory, snapshots, changed areas, file service URL).
//! * [`changed`]: changed areas (byte ranges of any alignment) into the engine's 64 KiB bitmap.
//! * [`flow`]: `backup --vsphere`, `export --vsphere`, `vsphere update-paths`.
//! * [`gc`]: `gc --vsphere`, the snapshots interrupted runs left.
//! * [`snapshot`]: the run's snapshot, taken and removed whatever happens.
//! * [`state`]: the chain state around a run, and `commit` of a pending point.
//! * [`types`]: faults, errors, managed object references, the endpoint.
//! * [`data`]: the seam where the datastore reader plugs in.
//!
//! Secrets (the password, the `vmware-api-session-id` token) are [`crate::xapi::Secret`]s:
//! never logged, never in errors or `Debug`.

pub mod calls;
pub mod changed;
pub mod cli;
pub mod client;
pub mod data;
pub mod flow;
pub mod gc;
mod snapshot;
pub mod state;
pub mod types;

#[cfg(test)]
mod tests;
