//! The command line of the vSphere flows: flags into [`super::flow`]'s options. Everything
//! the flags can get wrong (the password, the trust flags, the URL) is a usage error before
//! any login.

use super::flow::{self, Output, RunOptions, StateAt, VsphereLogin};
use crate::cli::{run_async, BackupArgs, ExportArgs, GcArgs, VsphereArgs, XapiArgs};
use crate::exit::{fail, Code, Failure, WithCode};
use crate::repo::point_writer::PointTarget;
use std::path::Path;

pub fn login(
    url: &str,
    user: &str,
    password_file: Option<&Path>,
    vs: &VsphereArgs,
) -> Result<VsphereLogin, Failure> {
    super::client::Endpoint::parse(url).code(Code::Usage)?;
    let trust = crate::tls::trust_from_flags(
        vs.vsphere_ca.as_deref(),
        None,
        vs.vsphere_pin.as_deref(),
        vs.vsphere_insecure,
    )
    .code(Code::Usage)?;
    Ok(VsphereLogin {
        url: url.to_owned(),
        user: user.to_owned(),
        password: flow::read_password(password_file)?,
        trust,
        release: vs.vsphere_release.clone(),
    })
}

/// The login of a command whose `--vsphere URL` clap made sure of, with its shared flags.
fn login_of(
    url: Option<&str>,
    xapi_args: &XapiArgs,
    vs: &VsphereArgs,
) -> Result<VsphereLogin, Failure> {
    let url = url.unwrap_or_default();
    login(url, &xapi_args.user, xapi_args.password_file.as_deref(), vs)
}

pub fn backup(args: BackupArgs) -> Result<(), Failure> {
    let login = login_of(args.vsphere.as_deref(), &args.xapi_args, &args.vs)?;
    if !crate::repo::store::valid_name(&args.vm) {
        return Err(fail(
            Code::Usage,
            format!("--vm {:?} is not a moId or a UUID", args.vm),
        ));
    }
    let target = args.repo.point_target(args.out.as_deref())?;
    // With --repo and no --state the chain state lives in the repository, as for XenServer.
    let state = match (&args.state, &target) {
        (Some(path), _) => StateAt::File(path.clone()),
        (None, PointTarget::Repo(_)) => StateAt::Repository,
        (None, PointTarget::Dir(_)) => StateAt::Nowhere,
    };
    let json = args.dp.json;
    let opts = RunOptions {
        login,
        vm: args.vm,
        output: Output::Point(target),
        state,
        full: false,
        enable_cbt: args.enable_cbt,
        quiesce: args.quiesce,
        fallback_full: args.fallback_full,
        break_lock: args.repo.break_lock,
        dp: args.dp.options(),
    };
    let report = run_async(flow::run(opts))?;
    println!("{}", report.location);
    if json {
        eprintln!("{}", report_json(&report));
    }
    Ok(())
}

pub fn export(args: ExportArgs) -> Result<(), Failure> {
    let login = login_of(args.vsphere.as_deref(), &args.xapi_args, &args.vs)?;
    let json = args.dp.json;
    let opts = RunOptions {
        login,
        vm: args.vm.clone().unwrap_or_default(),
        output: Output::Stream {
            disk: args.disk.unwrap_or_default(),
            destination: args.destination(),
        },
        state: args.state.clone().map_or(StateAt::Nowhere, StateAt::File),
        full: args.full,
        enable_cbt: args.enable_cbt,
        quiesce: args.quiesce,
        fallback_full: args.fallback_full,
        break_lock: false,
        dp: args.dp.options(),
    };
    let report = run_async(flow::run(opts))?;
    if json {
        eprintln!("{}", report_json(&report));
    }
    Ok(())
}

fn report_json(r: &flow::RunReport) -> serde_json::Value {
    serde_json::json!({
        "point": r.point,
        "base": r.base,
        "location": r.location,
        "committed": r.committed,
        "bytes_read": r.summaries.iter().map(|s| s.bytes_read).sum::<u64>(),
        "bytes_written": r.summaries.iter().map(|s| s.bytes_written).sum::<u64>(),
        // The data plane's time (reads, stream, sink), without the vCenter calls around it.
        "data_seconds": r.summaries.iter().map(|s| s.seconds).sum::<f64>(),
    })
}

pub fn gc(args: GcArgs) -> Result<(), Failure> {
    let login = login_of(args.vsphere.as_deref(), &args.xapi_args, &args.vs)?;
    let opts = super::gc::GcOptions {
        login,
        vm: args.vm.clone().unwrap_or_default(),
        state: args.state.clone(),
        repo: crate::cli::repo_gc(&args.repo)?,
        dry_run: args.dry_run,
        force: args.force,
    };
    let report = run_async(super::gc::run(opts))?;
    for line in &report.lines {
        println!("{line}");
    }
    Ok(())
}
