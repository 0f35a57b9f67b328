//! The image sidecar (`IMAGE.cbtstream`): which point in time an image holds, and whether it
//! holds it completely. The format is in `docs/FORMAT.md`.

use super::report::unix_now;
use super::RestoreError;
use cbtstream_proto::stream::{Header, Trailer};
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

/// Suffix appended to the image path to name its sidecar.
pub const SIDECAR_SUFFIX: &str = ".cbtstream";
/// Largest sidecar accepted; a real one is a few hundred bytes.
const MAX_SIDECAR_LEN: u64 = 64 * 1024;
/// First line of a sidecar file (format name and version).
const SIDECAR_MAGIC: &str = "cbtstream-image 1";

/// The state a sidecar records for an image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageStatus {
    /// A stream is (or was, if the restore died) being applied: the content is undefined.
    Applying,
    /// The image holds exactly `point_id`.
    Complete,
}

/// The content of an image's sidecar (`IMAGE.cbtstream`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageState {
    pub status: ImageStatus,
    pub point_id: String,
    pub source_id: String,
    pub base_id: Option<String>,
    pub virtual_size: u64,
    /// XXH3-128 digest of the last stream applied (only when complete).
    pub stream_digest: Option<String>,
    pub updated_unix_secs: u64,
}

impl ImageState {
    /// The state while `header`'s stream is being applied, or after a restore of it died.
    pub(super) fn applying(header: &Header) -> ImageState {
        ImageState {
            status: ImageStatus::Applying,
            point_id: header.point_id.clone(),
            source_id: header.source_id.clone(),
            base_id: header.base_id.clone(),
            virtual_size: header.virtual_size,
            stream_digest: None,
            updated_unix_secs: unix_now(),
        }
    }

    /// The state once `header`'s stream, which ended with `trailer`, is on disk.
    pub(super) fn complete(header: &Header, trailer: &Trailer) -> ImageState {
        ImageState {
            status: ImageStatus::Complete,
            stream_digest: Some(trailer.digest_hex()),
            ..ImageState::applying(header)
        }
    }

    fn render(&self) -> String {
        let mut s = String::with_capacity(256);
        s.push_str(SIDECAR_MAGIC);
        s.push('\n');
        let status = match self.status {
            ImageStatus::Applying => "applying",
            ImageStatus::Complete => "complete",
        };
        s.push_str(&format!("state={status}\n"));
        s.push_str(&format!("point_id={}\n", self.point_id));
        s.push_str(&format!("source_id={}\n", self.source_id));
        s.push_str(&format!(
            "base_id={}\n",
            self.base_id.as_deref().unwrap_or("")
        ));
        s.push_str(&format!("virtual_size={}\n", self.virtual_size));
        if let Some(d) = &self.stream_digest {
            s.push_str(&format!("stream_digest={d}\n"));
        }
        s.push_str(&format!("updated_unix_secs={}\n", self.updated_unix_secs));
        s
    }

    fn parse(text: &str) -> Result<ImageState, String> {
        let mut lines = text.lines();
        match lines.next() {
            Some(SIDECAR_MAGIC) => {}
            Some(l) if l.starts_with("cbtstream-image ") => {
                return Err(format!("unsupported sidecar version `{l}`"))
            }
            _ => return Err("not a cbtstream sidecar".into()),
        }
        let (mut status, mut point, mut source, mut base, mut size, mut digest, mut updated) =
            (None, None, None, None, None, None, 0);
        for line in lines {
            let Some((key, value)) = line.split_once('=') else {
                return Err(format!("malformed line `{line}`"));
            };
            match key {
                "state" => {
                    status = Some(match value {
                        "applying" => ImageStatus::Applying,
                        "complete" => ImageStatus::Complete,
                        other => return Err(format!("unknown state `{other}`")),
                    })
                }
                "point_id" => point = Some(value.to_owned()),
                "source_id" => source = Some(value.to_owned()),
                "base_id" => base = (!value.is_empty()).then(|| value.to_owned()),
                "virtual_size" => {
                    size = Some(
                        value
                            .parse::<u64>()
                            .map_err(|_| format!("bad virtual_size `{value}`"))?,
                    )
                }
                "stream_digest" => digest = Some(value.to_owned()),
                "updated_unix_secs" => updated = value.parse().unwrap_or(0),
                _ => {} // Unknown keys are for newer writers; ignore them.
            }
        }
        match (status, point, source, size) {
            (Some(status), Some(point_id), Some(source_id), Some(virtual_size)) => Ok(ImageState {
                status,
                point_id,
                source_id,
                base_id: base,
                virtual_size,
                stream_digest: digest,
                updated_unix_secs: updated,
            }),
            _ => Err("missing state, point_id, source_id or virtual_size".into()),
        }
    }
}

/// The sidecar path of an image: the image path with [`SIDECAR_SUFFIX`] appended.
pub fn sidecar_path(image: &Path) -> PathBuf {
    crate::durable::with_suffix(image, SIDECAR_SUFFIX)
}

/// The state recorded in an image's sidecar; `Ok(None)` if there is no sidecar.
pub fn image_state(image: &Path) -> Result<Option<ImageState>, RestoreError> {
    let path = sidecar_path(image);
    let text = match read_at_most(&path, MAX_SIDECAR_LEN) {
        Ok(Some(bytes)) => bytes,
        Ok(None) => {
            return Err(RestoreError::IncompleteImage {
                path: image.to_owned(),
                reason: format!("sidecar {} is too large to be one", path.display()),
            })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(RestoreError::Image { path, error }),
    };
    let text = String::from_utf8(text).map_err(|_| RestoreError::IncompleteImage {
        path: image.to_owned(),
        reason: format!("sidecar {} is not UTF-8", path.display()),
    })?;
    ImageState::parse(&text)
        .map(Some)
        .map_err(|e| RestoreError::IncompleteImage {
            path: image.to_owned(),
            reason: format!("sidecar {} is unreadable: {e}", path.display()),
        })
}

/// The contents of `path`, or `None` if it holds more than `limit` bytes (found without
/// reading more than that: the file is not trusted to be small).
fn read_at_most(path: &Path, limit: u64) -> io::Result<Option<Vec<u8>>> {
    let mut bytes = Vec::new();
    fs::File::open(path)?
        .take(limit + 1)
        .read_to_end(&mut bytes)?;
    Ok((bytes.len() as u64 <= limit).then_some(bytes))
}

/// Writes the sidecar atomically: temp file, fsync, rename, fsync of the directory.
pub(super) fn write_image_state(image: &Path, state: &ImageState) -> Result<(), RestoreError> {
    let path = sidecar_path(image);
    crate::durable::replace(&path, state.render().as_bytes())
        .map_err(|error| RestoreError::Image { path, error })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_sidecar_is_refused_without_reading_it() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.raw");
        // 1 TiB, sparse: reading it whole would exhaust memory.
        let f = fs::File::create(sidecar_path(&image)).unwrap();
        f.set_len(1 << 40).unwrap();
        let e = image_state(&image).unwrap_err();
        assert!(e.to_string().contains("too large to be one"), "{e}");
        f.set_len(MAX_SIDECAR_LEN).unwrap();
        let e = image_state(&image).unwrap_err();
        assert!(e.to_string().contains("not a cbtstream sidecar"), "{e}");
    }

    #[test]
    fn sidecar_round_trips() {
        let s = ImageState {
            status: ImageStatus::Complete,
            point_id: "p=1 x".into(),
            source_id: String::new(),
            base_id: None,
            virtual_size: 42,
            stream_digest: Some("ab".into()),
            updated_unix_secs: 5,
        };
        assert_eq!(ImageState::parse(&s.render()).unwrap(), s);
        let mut t = s.clone();
        t.status = ImageStatus::Applying;
        t.base_id = Some("b".into());
        t.stream_digest = None;
        assert_eq!(ImageState::parse(&t.render()).unwrap(), t);
        assert!(ImageState::parse("cbtstream-image 2\n").is_err());
        assert!(ImageState::parse("cbtstream-image 1\nstate=complete\n").is_err());
        assert!(ImageState::parse(&s.render().replace("complete", "done")).is_err());
        assert_eq!(
            sidecar_path(Path::new("/a/b.raw")),
            PathBuf::from("/a/b.raw.cbtstream")
        );
    }

    proptest::proptest! {
        /// Whatever a sidecar holds, reading it gives a state or an error, never a panic; and
        /// any ids a stream can carry come back as they were written.
        #[test]
        fn parse_any_text_and_round_trip_any_ids(
            text in "(cbtstream-image 1\n)?([a-z_]{0,12}=?[ -~]{0,20}\n){0,8}",
            point in "[^\\p{Cc}]{1,40}",
            source in "[^\\p{Cc}]{0,40}",
            size in proptest::prelude::any::<u64>(),
        ) {
            let _ = ImageState::parse(&text);
            let s = ImageState {
                status: ImageStatus::Complete,
                point_id: point,
                source_id: source,
                base_id: None,
                virtual_size: size,
                stream_digest: Some("00".into()),
                updated_unix_secs: 1,
            };
            proptest::prop_assert_eq!(ImageState::parse(&s.render()).unwrap(), s);
        }
    }
}
