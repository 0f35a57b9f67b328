//! Empty on purpose: this crate only holds `tests/vim_rs_drives_the_simulator.rs`, which
//! drives the vSphere simulator with `vim_rs` to prove the simulator's VI/JSON wire format
//! against a client generated from VMware's published specification.
