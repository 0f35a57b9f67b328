//! The repository's command-line arguments and commands (`repo init`, `list`), kept apart
//! from cli.rs, which they plug into.

use crate::exit::{Code, Failure, WithCode};
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
