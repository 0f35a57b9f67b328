//! `restore`: apply cbtstream streams to a raw image; `inspect`: verify a stream end to end.
//!
//! Synchronous std::io on purpose: restore is one sequential read of each stream and positioned
//! writes to one file. Two threads per stream: one reads and decodes (structure, order, XXH3-128
//! digest), the caller's thread decompresses, checks and writes, so hashing and reading overlap
//! with zstd. Buffers are reused; the only per-record allocations are the decoder's.
//!
//! An image is never left looking complete while it is half-applied: a sidecar file next to it
//! (`IMAGE.cbtstream`, see `docs/FORMAT.md`) says `applying` before the first byte of a stream
//! touches the image, and `complete` only after the stream's trailer and digest verified and the
//! image was fsynced. Incrementals are only applied onto an image whose sidecar says `complete`
//! at exactly their base point.
//!
//! The parts: [`sidecar`] (the image's state file), [`input`] (reading and decoding a stream on
//! its own thread), [`decode`] (decompressing and checking one record), [`apply`] (writing
//! records to the image), [`inspect`] (verifying a stream without an image), [`report`]
//! (what a restore prints) and [`verified`] (the same chain checks and verified records for
//! a target that is not a local image: `restore --xapi`).

mod apply;
mod decode;
mod input;
mod inspect;
pub(crate) mod report;
mod sidecar;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod testutil;
pub mod verified;

pub use inspect::inspect;
pub use report::RestoreReport;
use sidecar::write_image_state;
pub use sidecar::{image_state, sidecar_path, ImageState, ImageStatus};

/// Suffix appended to the image path to name the file a full restore writes before it
/// replaces the image.
pub const PARTIAL_SUFFIX: &str = ".partial";

use crate::exit::Code;
use apply::Applier;
use cbtstream_proto::stream::{Header, StreamError, Trailer};
use decode::PayloadDecoder;
use input::Input;
pub use input::StreamInput;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Everything that can stop a restore or an inspect.
///
/// Each message is complete on its own (the underlying error is part of it, not a `source`),
/// so printing the error with `{}` says which input, which record and what went wrong.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("invalid restore request: {0}")]
    Usage(String),
    #[error("cannot open {input}: {error}")]
    Open { input: String, error: io::Error },
    #[error("reading {input}: {error}")]
    Input { input: String, error: io::Error },
    #[error("image {}: {error}", path.display())]
    Image { path: PathBuf, error: io::Error },
    #[error("{input}: {error}")]
    Damaged { input: String, error: StreamError },
    #[error("{input} does not follow on: {reason}")]
    ChainMismatch { input: String, reason: String },
    #[error("image {} does not exist: {input} is an incremental stream and needs the image it applies to", path.display())]
    MissingImage { path: PathBuf, input: String },
    #[error("image {} is not known to be complete: {reason}", path.display())]
    IncompleteImage { path: PathBuf, reason: String },
    #[error("internal error: {0}")]
    Internal(String),
}

impl RestoreError {
    /// The exit code (see the table in README.md). An input that cannot be opened is a bad
    /// argument, like an unreadable bitmap for export; one that fails while it is read is a
    /// failed source.
    pub fn exit_code(&self) -> Code {
        match self {
            RestoreError::Usage(_) | RestoreError::Open { .. } => Code::Usage,
            RestoreError::Input { .. } => Code::Source,
            RestoreError::Damaged { .. }
            | RestoreError::ChainMismatch { .. }
            | RestoreError::MissingImage { .. }
            | RestoreError::IncompleteImage { .. } => Code::Integrity,
            RestoreError::Image { .. } => Code::Output,
            RestoreError::Internal(_) => Code::Failure,
        }
    }
}

/// Applies `inputs` in order to the raw image `to`. See the module documentation.
pub fn restore(to: &Path, inputs: &[PathBuf]) -> Result<RestoreReport, RestoreError> {
    restore_inputs(to, StreamInput::paths(inputs))
}

/// [`restore`] from any inputs (files, or objects of a repository).
pub fn restore_inputs(to: &Path, inputs: Vec<StreamInput>) -> Result<RestoreReport, RestoreError> {
    let started = Instant::now();
    check_inputs(&inputs)?;
    match fs::symlink_metadata(to) {
        // A full restore replaces the file at `to`: it would replace the link, not its target.
        Ok(m) if m.file_type().is_symlink() => {
            return Err(RestoreError::Usage(format!(
                "{} is a symbolic link: give the path of the image itself",
                to.display()
            )))
        }
        Ok(m) if !m.is_file() => {
            return Err(RestoreError::Usage(format!(
                "{} is not a regular file (only raw image files are supported)",
                to.display()
            )))
        }
        _ => {}
    }

    // Every header first, so a broken chain is refused before the image is touched.
    let streams = open_inputs(inputs)?;
    check_chain(&streams, &|input| {
        let state = complete_image_state(to, input)?;
        Ok((
            state.point_id,
            state.source_id,
            format!("the image {}", to.display()),
        ))
    })?;

    let mut applier = Applier::new()?;
    let mut report = RestoreReport {
        image: to.to_owned(),
        ..RestoreReport::default()
    };
    // From the first full stream on, everything goes to IMAGE.partial, which replaces the image
    // only once the last stream verified; incrementals before it are applied in place.
    let partial = crate::durable::with_suffix(to, PARTIAL_SUFFIX);
    let mut into_partial: Option<(Header, Trailer)> = None;
    for (input, header) in streams {
        if header.is_full() || into_partial.is_some() {
            match applier.apply(&partial, input, &header, &mut report) {
                Ok(trailer) => into_partial = Some((header, trailer)),
                Err(e) => return Err(discard(&partial, e)),
            }
        } else {
            write_image_state(to, &ImageState::applying(&header))?;
            let trailer = applier.apply(to, input, &header, &mut report)?;
            write_image_state(to, &ImageState::complete(&header, &trailer))?;
        }
    }
    if let Some((header, trailer)) = into_partial {
        replace_image(to, &partial, &header, &trailer).map_err(|e| discard(&partial, e))?;
    }
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Puts the verified and fsynced `partial` in place of `image`. The sidecar says `applying`
/// before the rename and `complete` after it, so at no crash point does the sidecar call the
/// image complete at a point it does not hold (see docs/FORMAT.md).
fn replace_image(
    image: &Path,
    partial: &Path,
    header: &Header,
    trailer: &Trailer,
) -> Result<(), RestoreError> {
    write_image_state(image, &ImageState::applying(header))?;
    crate::durable::commit_rename(partial, image).map_err(|error| RestoreError::Image {
        path: image.to_owned(),
        error,
    })?;
    write_image_state(image, &ImageState::complete(header, trailer))
}

/// Removes what is left of a failed restore into `partial` (nothing once it was renamed) and
/// returns the error that stopped it.
fn discard(partial: &Path, error: RestoreError) -> RestoreError {
    if let Err(e) = fs::remove_file(partial) {
        if e.kind() != io::ErrorKind::NotFound {
            tracing::warn!(path = %partial.display(), "could not remove a failed restore's output: {e}");
        }
    }
    error
}

/// At least one input, and stdin at most once.
fn check_inputs(inputs: &[StreamInput]) -> Result<(), RestoreError> {
    if inputs.is_empty() {
        return Err(RestoreError::Usage("no input streams".into()));
    }
    if inputs.iter().filter(|i| i.is_stdin()).count() > 1 {
        return Err(RestoreError::Usage(
            "standard input (-) can be given only once".into(),
        ));
    }
    Ok(())
}

/// Opens every input and reads its header.
fn open_inputs(inputs: Vec<StreamInput>) -> Result<Vec<(Input, Header)>, RestoreError> {
    check_inputs(&inputs)?;
    let mut streams = Vec::with_capacity(inputs.len());
    for i in inputs {
        let mut input = Input::open_input(i)?;
        let header = input.read_header()?;
        streams.push((input, header));
    }
    Ok(streams)
}

/// Where the target is before the first incremental that is not preceded by a full stream
/// of the same restore: (point, source, how to name the target in a message). Called with
/// the input's name; fails when the target is not known to be complete.
pub type StartingPoint<'a> = &'a dyn Fn(&str) -> Result<(String, String, String), RestoreError>;

/// Where the target will be before a stream: the previous stream of this restore, or else
/// the target's recorded complete state.
fn before(
    previous: Option<(String, String, String)>,
    start: StartingPoint<'_>,
    input: &str,
) -> Result<(String, String, String), RestoreError> {
    match previous {
        Some(p) => Ok(p),
        None => start(input),
    }
}

/// Checks that each stream follows on from the previous one, and the first incremental from
/// the target's recorded state.
fn check_chain(streams: &[(Input, Header)], start: StartingPoint<'_>) -> Result<(), RestoreError> {
    // (point, source, where it comes from) the image will be at before each stream.
    let mut current: Option<(String, String, String)> = None;
    for (i, (input, h)) in streams.iter().enumerate() {
        if h.incremental && h.base_id.is_none() {
            // An incremental whose base was not named: it applies onto any complete image.
            let (_, source, from) = before(current.take(), start, &input.name)?;
            tracing::warn!(
                input = %input.name,
                "incremental without a base id: applied onto {from} without checking that it is the right base"
            );
            current = Some((h.point_id.clone(), source, input.name.clone()));
            continue;
        }
        let Some(base) = &h.base_id else {
            if i > 0 {
                tracing::warn!(
                    input = %input.name,
                    "full stream after other streams: it replaces everything they restored"
                );
            }
            current = Some((h.point_id.clone(), h.source_id.clone(), input.name.clone()));
            continue;
        };
        let (point, source, from) = before(current.take(), start, &input.name)?;
        if *base != point {
            return Err(RestoreError::ChainMismatch {
                input: input.name.clone(),
                reason: format!("its base is point `{base}`, but {from} is at point `{point}`"),
            });
        }
        if h.source_id != source {
            return Err(RestoreError::ChainMismatch {
                input: input.name.clone(),
                reason: format!(
                    "it comes from source `{}`, but {from} comes from source `{source}`",
                    h.source_id
                ),
            });
        }
        current = Some((h.point_id.clone(), h.source_id.clone(), input.name.clone()));
    }
    Ok(())
}

/// The image's recorded state, which must say `complete` and match the image's size.
fn complete_image_state(to: &Path, input: &str) -> Result<ImageState, RestoreError> {
    let len = match fs::metadata(to) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(RestoreError::MissingImage {
                path: to.to_owned(),
                input: input.to_owned(),
            })
        }
        Err(error) => {
            return Err(RestoreError::Image {
                path: to.to_owned(),
                error,
            })
        }
    };
    let incomplete = |reason: String| RestoreError::IncompleteImage {
        path: to.to_owned(),
        reason,
    };
    let Some(state) = image_state(to)? else {
        return Err(incomplete(format!(
            "it has no sidecar {}, so which point in time it holds is unknown; restore a full stream first",
            sidecar_path(to).display()
        )));
    };
    if state.status != ImageStatus::Complete {
        return Err(incomplete(format!(
            "a restore to point `{}` was started and did not finish, so the image is half-applied; \
             restore again starting from a full stream",
            state.point_id
        )));
    }
    if len != state.virtual_size {
        return Err(incomplete(format!(
            "its size {len} differs from the {} bytes recorded for point `{}`",
            state.virtual_size, state.point_id
        )));
    }
    Ok(state)
}
