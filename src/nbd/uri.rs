//! NBD URIs (the NBD URI specification): `nbd://`, `nbds://`, `nbd+unix://`, `nbds+unix://`,
//! with the export name in the path and `?socket=PATH` for Unix sockets.

use std::fmt;
use std::path::PathBuf;

pub const DEFAULT_PORT: u16 = 10809;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Tcp { host: String, port: u16 },
    Unix(PathBuf),
}

/// A parsed NBD URI. Its `Debug` output hides the export name (it may carry a token).
#[derive(Clone, PartialEq, Eq)]
pub struct NbdUri {
    pub tls: bool,
    pub address: Address,
    pub export: String,
}

impl fmt::Debug for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

/// Displays the URI without its export name.
impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = if self.tls { "nbds" } else { "nbd" };
        match &self.address {
            Address::Tcp { host, port } if host.contains(':') => {
                write!(f, "{s}://[{host}]:{port}/…")
            }
            Address::Tcp { host, port } => write!(f, "{s}://{host}:{port}/…"),
            Address::Unix(p) => write!(f, "{s}+unix:///…?socket={}", p.display()),
        }
    }
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum UriError {
    #[error("not an NBD URI: expected nbd://, nbds://, nbd+unix:// or nbds+unix://")]
    Scheme,
    #[error("bad port in NBD URI")]
    Port,
    #[error("NBD URI has no host")]
    NoHost,
    #[error("nbd+unix URI needs ?socket=PATH")]
    NoSocket,
    #[error("bad percent-encoding in NBD URI")]
    Percent,
}

fn percent_decode(s: &str) -> Result<String, UriError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3).ok_or(UriError::Percent)?;
            let digit = |d: u8| char::from(d).to_digit(16).ok_or(UriError::Percent);
            out.push((digit(hex[0])? << 4 | digit(hex[1])?) as u8);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| UriError::Percent)
}

impl std::str::FromStr for NbdUri {
    type Err = UriError;

    fn from_str(uri: &str) -> Result<Self, UriError> {
        let (scheme, rest) = uri.split_once("://").ok_or(UriError::Scheme)?;
        let (tls, unix) = match scheme {
            "nbd" => (false, false),
            "nbds" => (true, false),
            "nbd+unix" => (false, true),
            "nbds+unix" => (true, true),
            _ => return Err(UriError::Scheme),
        };
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let export = percent_decode(path)?;
        let address = if unix {
            let socket = query
                .into_iter()
                .flat_map(|q| q.split('&'))
                .find_map(|kv| kv.strip_prefix("socket="))
                .ok_or(UriError::NoSocket)?;
            Address::Unix(PathBuf::from(percent_decode(socket)?))
        } else {
            let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
                let (h, after) = v6.split_once(']').ok_or(UriError::NoHost)?;
                (h.to_string(), after.strip_prefix(':'))
            } else {
                match authority.rsplit_once(':') {
                    Some((h, p)) => (h.to_string(), Some(p)),
                    None => (authority.to_string(), None),
                }
            };
            if host.is_empty() {
                return Err(UriError::NoHost);
            }
            let port = match port {
                Some(p) => p.parse().map_err(|_| UriError::Port)?,
                None => DEFAULT_PORT,
            };
            Address::Tcp { host, port }
        };
        Ok(NbdUri {
            tls,
            address,
            export,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses() {
        let u: NbdUri = "nbds://127.0.0.1:10811/disk".parse().unwrap();
        assert!(u.tls);
        assert_eq!(
            u.address,
            Address::Tcp {
                host: "127.0.0.1".into(),
                port: 10811
            }
        );
        assert_eq!(u.export, "disk");
        let u: NbdUri = "nbd://[::1]/a%2Fb".parse().unwrap();
        assert_eq!(
            u.address,
            Address::Tcp {
                host: "::1".into(),
                port: 10809
            }
        );
        assert_eq!(u.export, "a/b");
        let u: NbdUri = "nbd+unix:///x?socket=/tmp/s".parse().unwrap();
        assert_eq!(u.address, Address::Unix("/tmp/s".into()));
        assert_eq!(format!("{u}"), "nbd+unix:///…?socket=/tmp/s");
        assert!("http://x".parse::<NbdUri>().is_err());
        assert!("nbd://h:99999/".parse::<NbdUri>().is_err());
        assert!("nbd+unix:///x".parse::<NbdUri>().is_err());
        // from_str_radix would take the sign: "%+1" is not an escape.
        assert_eq!("nbd://h/%+1".parse::<NbdUri>(), Err(UriError::Percent));
        assert_eq!("nbd://h/%e".parse::<NbdUri>(), Err(UriError::Percent));
        let secret: NbdUri = "nbds://h/secret-token".parse().unwrap();
        assert!(!format!("{secret:?} {secret}").contains("secret-token"));
    }
}
