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

/// A command left behind when the export is abandoned (a signal) must not read the EOF of a
/// truncated stream and take it for a whole one: it is killed and reaped.
impl Drop for StreamCommand {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
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
    /// whole stream (a truncated stream has no trailer; restore refuses it anyway). Returns
    /// the command's failure when it had already ended with one (which is then most likely
    /// why the stream failed: a broken pipe).
    pub async fn kill(mut self) -> Option<CommandError> {
        // A command that failed on its own may still be exiting when its pipe breaks: give
        // it a moment, so that its status is what the error names.
        let mut ended = None;
        for _ in 0..50 {
            ended = self.child.try_wait().ok().flatten();
            if ended.is_some() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let _ = self.child.kill();
        let _ = tokio::task::spawn_blocking(move || self.child.wait()).await;
        ended.filter(|s| !s.success()).map(CommandError::Failed)
    }
}
