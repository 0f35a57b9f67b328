//! Where a repository lives: a local directory, or `s3://bucket/prefix` on S3 or an
//! S3-compatible store.

use std::fmt;
use std::path::PathBuf;

/// A repository's location, as given on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Dir(PathBuf),
    S3 { bucket: String, prefix: String },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LocationError {
    #[error("an S3 location is s3://BUCKET[/PREFIX], not {0:?}")]
    BadS3(String),
    #[error("the repository location is empty")]
    Empty,
    #[error("{0} is not a repository location: only s3:// URLs and directories are")]
    OtherScheme(String),
    #[error(
        "--s3-endpoint {0} must be https://, or http:// on a loopback address (127.0.0.1, ::1, localhost)"
    )]
    InsecureEndpoint(String),
    #[error("--s3-endpoint {0} is not an http:// or https:// URL")]
    BadEndpoint(String),
}

impl Location {
    pub fn parse(s: &str) -> Result<Location, LocationError> {
        if s.is_empty() {
            return Err(LocationError::Empty);
        }
        if let Some(rest) = s.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let prefix = prefix.trim_matches('/');
            // Bucket names: 3-63 of [a-z0-9.-] (AWS's rules, which S3-compatible stores share).
            let bucket_ok = (3..=63).contains(&bucket.len())
                && bucket.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-'
                });
            let prefix_ok = prefix.split('/').all(|c| {
                c.is_empty() && prefix.is_empty() || (!c.is_empty() && c != "." && c != "..")
            }) && !prefix.chars().any(|c| c.is_control());
            if !bucket_ok || !prefix_ok {
                return Err(LocationError::BadS3(s.to_owned()));
            }
            return Ok(Location::S3 {
                bucket: bucket.to_owned(),
                prefix: prefix.to_owned(),
            });
        }
        if let Some((scheme, _)) = s.split_once("://") {
            if !scheme.is_empty() && scheme.bytes().all(|b| b.is_ascii_alphanumeric()) {
                return Err(LocationError::OtherScheme(s.to_owned()));
            }
        }
        Ok(Location::Dir(PathBuf::from(s)))
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Dir(p) => write!(f, "{}", p.display()),
            Location::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            Location::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
        }
    }
}

/// Checks an `--s3-endpoint`: plain HTTP only to this machine.
pub fn check_endpoint(url: &str) -> Result<(), LocationError> {
    let bad = || LocationError::BadEndpoint(url.to_owned());
    let (scheme, rest) = url.split_once("://").ok_or_else(bad)?;
    let authority = rest.split('/').next().unwrap_or("");
    if authority.is_empty() || authority.contains('@') {
        return Err(bad());
    }
    match scheme {
        "https" => Ok(()),
        "http" => {
            let host = match authority.strip_prefix('[') {
                Some(v6) => v6.split(']').next().unwrap_or(""),
                None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
            };
            let loopback = host == "localhost"
                || host
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback());
            if loopback {
                Ok(())
            } else {
                Err(LocationError::InsecureEndpoint(url.to_owned()))
            }
        }
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_parse() {
        assert_eq!(
            Location::parse("s3://backups/site-a/nightly/").unwrap(),
            Location::S3 {
                bucket: "backups".into(),
                prefix: "site-a/nightly".into()
            }
        );
        assert_eq!(
            Location::parse("s3://backups").unwrap(),
            Location::S3 {
                bucket: "backups".into(),
                prefix: "".into()
            }
        );
        assert_eq!(
            Location::parse("/srv/repo").unwrap(),
            Location::Dir("/srv/repo".into())
        );
        for bad in [
            "s3://",
            "s3://Up",
            "s3://b/../x",
            "s3://bb",
            "s3://ok-bucket/a//b",
        ] {
            assert!(Location::parse(bad).is_err(), "{bad}");
        }
        assert!(matches!(
            Location::parse("gs://x/y"),
            Err(LocationError::OtherScheme(_))
        ));
        assert_eq!(
            Location::parse("s3://backups/x").unwrap().to_string(),
            "s3://backups/x"
        );
    }

    #[test]
    fn plain_http_only_on_loopback() {
        for ok in [
            "https://s3.example.com",
            "http://127.0.0.1:9000",
            "http://localhost:9000/",
            "http://[::1]:9000",
        ] {
            assert_eq!(check_endpoint(ok), Ok(()), "{ok}");
        }
        for bad in [
            "http://10.0.0.1:9000",
            "http://s3.example.com",
            "ftp://127.0.0.1",
            "127.0.0.1:9000",
            "http://user@127.0.0.1",
        ] {
            assert!(check_endpoint(bad).is_err(), "{bad}");
        }
    }
}
