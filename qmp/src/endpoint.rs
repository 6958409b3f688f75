//! [`Endpoint`]: where a QMP monitor listens, as a user writes it: `unix:PATH`, `tls://HOST:PORT` (QEMU's
//! `-chardev socket,host=..,port=..,server=on,tls-creds=..`, TLS from the first byte) or `tcp://HOST:PORT`
//! (the same without `tls-creds`, plaintext, allowed only explicitly).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// A QMP monitor's address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A unix socket on this host (`-qmp unix:PATH,server=on,wait=off`).
    Unix(PathBuf),
    /// TCP with TLS: the server's certificate must name `host`, and ours is presented.
    Tls { host: String, port: u16 },
    /// Plaintext TCP (tests and trusted networks only).
    Tcp { host: String, port: u16 },
}

impl Endpoint {
    /// Whether the monitor is reached over the network (so the VM's QEMU may run on another host, and
    /// paths it names are not paths on this one).
    pub fn is_remote(&self) -> bool {
        !matches!(self, Endpoint::Unix(_))
    }
}

/// Why an endpoint could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text:?} is not a QMP endpoint: {why} (give unix:PATH, tls://HOST:PORT or tcp://HOST:PORT)")]
pub struct ParseEndpointError {
    text: String,
    why: &'static str,
}

impl FromStr for Endpoint {
    type Err = ParseEndpointError;

    fn from_str(text: &str) -> Result<Endpoint, ParseEndpointError> {
        let fail = |why| ParseEndpointError {
            text: text.to_owned(),
            why,
        };
        if let Some(path) = text.strip_prefix("unix:") {
            let path = path.strip_prefix("//").unwrap_or(path);
            if path.is_empty() {
                return Err(fail("the path is empty"));
            }
            return Ok(Endpoint::Unix(PathBuf::from(path)));
        }
        let (tls, rest) = if let Some(rest) = text.strip_prefix("tls://") {
            (true, rest)
        } else if let Some(rest) = text.strip_prefix("tcp://") {
            (false, rest)
        } else {
            return Err(fail("unknown scheme"));
        };
        let (host, port) = split_host_port(rest).ok_or_else(|| fail("not HOST:PORT"))?;
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| fail("the port is not a number from 1 to 65535"))?;
        if host.is_empty() || host.contains(['/', '@', ' ']) {
            return Err(fail("the host is not a host name or address"));
        }
        let host = host.to_owned();
        Ok(if tls {
            Endpoint::Tls { host, port }
        } else {
            Endpoint::Tcp { host, port }
        })
    }
}

/// `host:port` or `[v6]:port` → (host without brackets, port text).
fn split_host_port(text: &str) -> Option<(&str, &str)> {
    if let Some(rest) = text.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = after.strip_prefix(':')?;
        return Some((host, port));
    }
    let (host, port) = text.rsplit_once(':')?;
    (!host.contains(':')).then_some((host, port))
}

/// `host:port`, bracketing an IPv6 address.
pub(crate) fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix(path) => write!(f, "unix:{}", path.display()),
            Endpoint::Tls { host, port } => write!(f, "tls://{}", host_port(host, *port)),
            Endpoint::Tcp { host, port } => write!(f, "tcp://{}", host_port(host, *port)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_every_form() {
        for (text, want) in [
            ("unix:/run/vm.sock", Endpoint::Unix("/run/vm.sock".into())),
            ("unix:rel.sock", Endpoint::Unix("rel.sock".into())),
            (
                "tls://hv1:4444",
                Endpoint::Tls {
                    host: "hv1".into(),
                    port: 4444,
                },
            ),
            (
                "tcp://10.0.0.1:4444",
                Endpoint::Tcp {
                    host: "10.0.0.1".into(),
                    port: 4444,
                },
            ),
            (
                "tls://[fd00::1]:4444",
                Endpoint::Tls {
                    host: "fd00::1".into(),
                    port: 4444,
                },
            ),
        ] {
            let parsed: Endpoint = text.parse().unwrap();
            assert_eq!(parsed, want, "{text}");
            assert_eq!(parsed.to_string(), text);
            assert_eq!(parsed.is_remote(), !text.starts_with("unix:"));
        }
        assert_eq!(
            "unix:///run/vm.sock".parse::<Endpoint>().unwrap(),
            Endpoint::Unix("/run/vm.sock".into())
        );
    }

    #[test]
    fn refuses_what_is_not_an_endpoint() {
        for text in [
            "/run/vm.sock",
            "unix:",
            "http://hv1:80",
            "tls://hv1",
            "tls://hv1:0",
            "tls://hv1:99999",
            "tls://:4444",
            "tcp://fd00::1:4444",
            "tls://user@hv1:4444",
        ] {
            let err = text.parse::<Endpoint>().unwrap_err();
            assert!(err.to_string().contains("tls://HOST:PORT"), "{text}: {err}");
        }
    }
}
