//! `--to-command CMD`: the stream goes to `sh -c CMD` on its stdin, and the export counts as
//! stored only when the command exits 0 (restic's `--stdin-from-command`, the other way
//! round). The command inherits stdout and stderr.

use std::os::fd::OwnedFd;
use std::process::{Child, Command, ExitStatus};

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("starting the --to-command command: {0}")]
    Spawn(std::io::Error),
    #[error("waiting for the --to-command command: {0}")]
    Wait(std::io::Error),
    #[error(
        "the --to-command command failed ({0}): the stream may not be stored, nothing was committed"
    )]
    Failed(ExitStatus),
}

pub struct StreamCommand {
    child: Child,
}

impl StreamCommand {
    /// Start the command; returns it and the write end of its stdin. Close every copy of
    /// that (which ends the command's input) before [`StreamCommand::wait_success`].
    pub fn spawn(cmd: &str) -> Result<(StreamCommand, OwnedFd), CommandError> {
        // Both ends are close-on-exec; the child gets the read end as its stdin only.
        let (read, write) = std::io::pipe().map_err(CommandError::Spawn)?;
        let child = Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .stdin(read)
            .spawn()
            .map_err(CommandError::Spawn)?;
        Ok((StreamCommand { child }, write.into()))
    }

    /// Wait for the command to end; an error unless it exited 0.
    pub async fn wait_success(mut self) -> Result<(), CommandError> {
        let status = tokio::task::spawn_blocking(move || self.child.wait())
            .await
            .map_err(|e| CommandError::Wait(std::io::Error::other(e)))?
            .map_err(CommandError::Wait)?;
        if status.success() {
            Ok(())
        } else {
            Err(CommandError::Failed(status))
        }
    }

    /// The stream failed: stop the command, so that what it received is not taken for a
    /// whole stream (a truncated stream has no trailer; restore refuses it anyway).
    pub async fn kill(mut self) {
        let _ = self.child.kill();
        let _ = tokio::task::spawn_blocking(move || self.child.wait()).await;
    }
}
