//! The repository's command-line arguments and commands (`repo init`, `list`), kept apart
//! from cli.rs, which they plug into.

use crate::exit::{Code, Failure, WithCode};
use crate::repo::point_writer::PointTarget;
use crate::repo::{Repo, RepoError, RepoOptions};
use clap::{Args, Subcommand};

/// `--repo LOCATION` where it is optional (backup).
#[derive(Args, Debug, Clone)]
pub struct RepoTarget {
    /// Store points in this repository (a directory or s3://bucket/prefix) instead of --out;
    /// without --state, the chain state lives there too.
    #[arg(long = "repo", value_name = "LOCATION")]
    pub location: Option<String>,
    /// S3-compatible endpoint URL (path-style requests); plain http:// only on loopback.
    #[arg(long, value_name = "URL", requires = "location")]
    pub s3_endpoint: Option<String>,
    /// Remove the VM's lock in the repository when it is stale (its owner died, or it expired).
    #[arg(long, requires = "location")]
    pub break_lock: bool,
}

impl RepoTarget {
    /// The repository `--repo` names, opened, or None without `--repo`.
    pub fn open(&self) -> Result<Option<Repo>, Failure> {
        self.location
            .as_deref()
            .map(|location| open_for_writing(location, self.s3_endpoint.clone()))
            .transpose()
    }

    /// Where a backup's points go: `--out DIR`, else the repository (clap makes sure of one).
    pub fn point_target(&self, out: Option<&std::path::Path>) -> Result<PointTarget, Failure> {
        if let Some(out) = out {
            return Ok(PointTarget::Dir(out.to_path_buf()));
        }
        match self.open()? {
            Some(repo) => Ok(PointTarget::Repo(repo)),
            None => Err(crate::exit::fail(
                Code::Usage,
                "give --out DIR or --repo LOCATION",
            )),
        }
    }
}

/// The repository at `location`, opened for a command that writes into it (the exit codes
/// of every repository command).
pub fn open_for_writing(location: &str, s3_endpoint: Option<String>) -> Result<Repo, Failure> {
    let opts = RepoOptions {
        location: location.to_owned(),
        s3_endpoint,
    };
    crate::cli::run_async(async { with_repo_code(Repo::open(&opts).await) })
}

/// `--repo LOCATION` where it is required.
#[derive(Args, Debug, Clone)]
pub struct RepoLocation {
    /// The repository: a directory or s3://bucket/prefix.
    #[arg(long = "repo", value_name = "LOCATION")]
    pub location: String,
    /// S3-compatible endpoint URL (path-style requests); plain http:// only on loopback.
    #[arg(long, value_name = "URL")]
    pub s3_endpoint: Option<String>,
}

impl RepoLocation {
    pub fn options(&self) -> RepoOptions {
        RepoOptions {
            location: self.location.clone(),
            s3_endpoint: self.s3_endpoint.clone(),
        }
    }
}

/// `--repo LOCATION --vm UUID --point ID|latest`: restore a point of a repository.
#[derive(Args, Debug, Clone)]
pub struct RepoPoint {
    /// Restore from this repository (a directory or s3://bucket/prefix): the chain of
    /// --point is found in it.
    #[arg(long = "repo", value_name = "LOCATION", requires_all = ["vm", "point"])]
    pub location: Option<String>,
    /// S3-compatible endpoint URL (path-style requests); plain http:// only on loopback.
    #[arg(long, value_name = "URL", requires = "location")]
    pub s3_endpoint: Option<String>,
    /// With --repo: the VM whose point to restore.
    #[arg(long, value_name = "UUID", requires = "location")]
    pub vm: Option<String>,
    /// With --repo: the point's id, or `latest` for the VM's newest point.
    #[arg(long, value_name = "ID|latest", requires = "location")]
    pub point: Option<String>,
}

impl RepoPoint {
    /// The repository, when --repo is given. It is the source of a restore: failing to
    /// read it exits 3, as a failed read of a stream does.
    pub async fn open(&self) -> Result<Option<Repo>, Failure> {
        let Some(location) = &self.location else {
            return Ok(None);
        };
        let opts = RepoOptions {
            location: location.clone(),
            s3_endpoint: self.s3_endpoint.clone(),
        };
        Repo::open(&opts)
            .await
            .map(Some)
            .map_err(crate::repo::restore::read_failure)
    }

    /// (VM, point) as given; clap makes both present with --repo.
    pub fn vm_point(&self) -> (&str, &str) {
        (
            self.vm.as_deref().unwrap_or_default(),
            self.point.as_deref().unwrap_or_default(),
        )
    }
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub repo: RepoLocation,
    /// Only this VM's points.
    #[arg(long, value_name = "UUID")]
    pub vm: Option<String>,
    /// Also decode every stream: each record's checksum, the stream digest, the header's ids.
    #[arg(long)]
    pub read_data: bool,
    /// One JSON object on stdout instead of the report.
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum RepoCommand {
    /// Create a repository: a directory or s3://bucket/prefix.
    Init {
        #[arg(value_name = "LOCATION")]
        location: String,
        /// S3-compatible endpoint URL (path-style requests); plain http:// only on loopback.
        #[arg(long, value_name = "URL")]
        s3_endpoint: Option<String>,
    },
}

#[derive(Args, Debug)]
pub struct ListArgs {
    #[command(flatten)]
    pub repo: RepoLocation,
    /// Only this VM's points.
    #[arg(long, value_name = "UUID")]
    pub vm: Option<String>,
    /// One JSON array on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// The exit code of a repository error: a damaged repository is an integrity failure.
pub fn repo_code(e: &RepoError) -> Code {
    match e {
        RepoError::Location(_) | RepoError::S3Settings(_) | RepoError::NotARepository(_) => {
            Code::Usage
        }
        RepoError::Exists(_) => Code::Usage,
        RepoError::Damaged { .. } => Code::Integrity,
        RepoError::Store(_) => Code::Output,
    }
}

pub fn with_repo_code<T>(r: Result<T, RepoError>) -> Result<T, Failure> {
    r.map_err(|e| Failure {
        code: repo_code(&e),
        error: e.into(),
    })
}

pub async fn repo_command(cmd: RepoCommand) -> Result<(), Failure> {
    match cmd {
        RepoCommand::Init {
            location,
            s3_endpoint,
        } => {
            let repo = with_repo_code(
                Repo::init(&RepoOptions {
                    location,
                    s3_endpoint,
                })
                .await,
            )?;
            println!("created repository {}", repo.location);
            Ok(())
        }
    }
}

pub async fn list(args: ListArgs) -> Result<(), Failure> {
    let repo = with_repo_code(Repo::open(&args.repo.options()).await)?;
    let rows = with_repo_code(crate::repo::list::list(&repo, args.vm.as_deref()).await)?;
    if args.json {
        println!("{}", serde_json::to_string(&rows).code(Code::Failure)?);
    } else {
        print!("{}", crate::repo::list::table(&rows));
    }
    Ok(())
}

/// `verify`: exit 0 when every point checks, 4 when anything is damaged or missing.
pub async fn verify(args: VerifyArgs) -> Result<(), Failure> {
    let repo = with_repo_code(Repo::open(&args.repo.options()).await)?;
    if let Some(vm) = &args.vm {
        let objects = if crate::repo::store::valid_name(vm) {
            let listed = repo.store.list(&crate::repo::vm_dir(vm)).await;
            with_repo_code(listed.map_err(RepoError::from))?
        } else {
            Vec::new()
        };
        if objects.is_empty() {
            return Err(crate::exit::fail(
                Code::Usage,
                format!("the repository {} has no VM {vm:?}", repo.location),
            ));
        }
    }
    let report = with_repo_code(
        crate::repo::verify::verify(&repo, args.vm.as_deref(), args.read_data).await,
    )?;
    if args.json {
        println!("{}", report.json_value());
    } else {
        print!("{}", report.text());
    }
    match report.problems.len() {
        0 => Ok(()),
        n => Err(crate::exit::fail(
            Code::Integrity,
            format!("{n} problem(s) found in {}", repo.location),
        )),
    }
}

#[derive(Args, Debug)]
pub struct PruneArgs {
    #[command(flatten)]
    pub repo: RepoLocation,
    /// Only this VM (by default, every VM of the repository).
    #[arg(long, value_name = "UUID")]
    pub vm: Option<String>,
    /// Keep the N newest points (the newest one, and the one the chain state names, are
    /// always kept).
    #[arg(long, value_name = "N")]
    pub keep_last: u32,
    /// Also keep the newest point of each of the last D days that have points (UTC).
    #[arg(long, value_name = "D", default_value_t = 0)]
    pub keep_daily: u32,
    /// Also keep the newest point of each of the last W ISO weeks that have points.
    #[arg(long, value_name = "W", default_value_t = 0)]
    pub keep_weekly: u32,
    /// Also keep the newest point of each of the last M months that have points.
    #[arg(long, value_name = "M", default_value_t = 0)]
    pub keep_monthly: u32,
    /// Print what would be kept, merged and deleted; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Remove the VM's lock in the repository when it is stale (its owner died, or it expired).
    #[arg(long)]
    pub break_lock: bool,
    /// One JSON array on stdout (one object per VM) instead of the table.
    #[arg(long)]
    pub json: bool,
}

pub async fn prune(args: PruneArgs) -> Result<(), Failure> {
    use crate::repo::prune;
    if let Some(vm) = &args.vm {
        if !crate::repo::store::valid_name(vm) {
            return Err(crate::exit::fail(
                Code::Usage,
                format!("--vm {vm:?} is not a VM uuid"),
            ));
        }
    }
    let policy = crate::repo::retention::Policy {
        last: args.keep_last,
        daily: args.keep_daily,
        weekly: args.keep_weekly,
        monthly: args.keep_monthly,
    };
    let repo = with_repo_code(Repo::open(&args.repo.options()).await)?;
    let vms = match &args.vm {
        Some(vm) => vec![vm.clone()],
        None => with_repo_code(repo.vms().await)?,
    };
    let mut done = Vec::new();
    for vm in vms {
        // A dry run changes nothing, so it neither waits for nor clears anything.
        let lock = if args.dry_run {
            None
        } else {
            Some(crate::xen::lock_repo_vm(&repo, &vm, "prune", args.break_lock).await?)
        };
        let pruned = prune::prune_vm(&repo, &vm, policy, args.dry_run).await;
        if let Some(lock) = lock {
            lock.release().await;
        }
        let pruned = pruned.map_err(|e| Failure {
            code: e.exit_code(),
            error: e.into(),
        })?;
        if !args.json {
            print!("{}", prune::table(&pruned));
        }
        done.push(pruned);
    }
    if args.json {
        println!("{}", serde_json::to_string(&done).code(Code::Failure)?);
    }
    Ok(())
}
