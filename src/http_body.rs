//! Reading an HTTP answer's body whole, within a limit (XenAPI calls, vSphere calls): a
//! Content-Length that announces more is refused before anything is read, and a body that
//! runs past the limit is cut off there.

use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::CONTENT_LENGTH;
use hyper::Response;

/// Why a body could not be read; each client names it in its own error type.
pub enum BodyError {
    /// Larger than the limit (announced, or found while reading).
    TooLarge,
    /// The connection failed while the body came.
    Http(hyper::Error),
    /// Anything else the body stack reported.
    Other(String),
}

pub async fn read_bounded(resp: Response<Incoming>, limit: u64) -> Result<Bytes, BodyError> {
    let announced = resp
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > limit) {
        return Err(BodyError::TooLarge);
    }
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    Ok(Limited::new(resp.into_body(), limit)
        .collect()
        .await
        .map_err(|e| match e.downcast::<hyper::Error>() {
            Ok(e) => BodyError::Http(*e),
            Err(e) if e.is::<LengthLimitError>() => BodyError::TooLarge,
            Err(e) => BodyError::Other(e.to_string()),
        })?
        .to_bytes())
}
