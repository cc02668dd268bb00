//! TLS to gearmand (`tls://host:port` servers, `[source.tls]`), with rustls. Certificate
//! verification is always on: the server's chain must lead to `ca_file` and name the host
//! (or `server_name`). [`Transport`] is what a connection reads and writes: plain TCP, or TLS
//! driven by hand over the same non-blocking socket, so the lanes' poll loop and deadlines
//! work unchanged (a TLS connection also wants POLLOUT while records wait to be written).

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore};

use crate::config::TlsFiles;

/// TLS for a connection: the client configuration and the name the certificate must carry.
pub type TlsTarget = (
    std::sync::Arc<rustls::ClientConfig>,
    rustls::pki_types::ServerName<'static>,
);
use crate::error::{Error, Result};
use crate::text::ShowPath;

/// Largest certificate or key file read.
const MAX_PEM: u64 = 1 << 20;

/// The scheme that asks for TLS in `servers`.
pub const SCHEME: &str = "tls://";

/// A server address from `servers`: `host:port`, and the name its certificate must carry when
/// it is a `tls://` one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: String,
    pub tls: Option<ServerName<'static>>,
}

impl Endpoint {
    /// `host:port` or `tls://host:port` (`server_name` overrides the host as the name checked).
    pub fn parse(server: &str, server_name: Option<&str>) -> std::result::Result<Endpoint, String> {
        let (addr, tls) = match server.strip_prefix(SCHEME) {
            Some(rest) => (rest, true),
            None => (server, false),
        };
        let Some((host, port)) = addr.rsplit_once(':') else {
            return Err(format!("server \"{server}\" is not host:port"));
        };
        if host.is_empty() || port.parse::<u16>().is_err() {
            return Err(format!("server \"{server}\" is not host:port"));
        }
        let tls = match tls {
            false => None,
            true => {
                let name =
                    server_name.unwrap_or(host.trim_start_matches('[').trim_end_matches(']'));
                Some(
                    ServerName::try_from(name.to_string())
                        .map_err(|_| format!("\"{name}\" is not a valid TLS server name"))?,
                )
            }
        };
        Ok(Endpoint {
            addr: addr.to_string(),
            tls,
        })
    }
}

/// Reads a certificate or key file: through `safefs` (root reads these at `check` and
/// `start`), so a link or FIFO planted in a directory another user can write is refused.
pub(crate) fn read_pem(path: &Path, what: &str) -> Result<Vec<u8>> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else {
        return Err(Error::Msg(format!("{what}: bad path \"{}\"", path.shown())));
    };
    let file = crate::ops::safefs::Dir::open(dir)?
        .file(name, crate::ops::safefs::Open::READ)?
        .file;
    crate::ops::safefs::read_bounded(file, MAX_PEM)
        .map_err(|e| Error::io_path(what, path, e))?
        .ok_or_else(|| Error::Invalid(format!("{what} \"{}\" is larger than 1 MiB", path.shown())))
}

/// Reads the CA (and client certificate and key) and builds the client configuration. Every
/// error names the file.
pub fn client_config(files: &TlsFiles) -> Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    add_roots(&mut roots, &files.ca_file)?;
    with_roots(roots, Some(files))
}

/// Adds the certificates of a PEM file to `roots`; a file without one is an error.
pub fn add_roots(roots: &mut RootCertStore, path: &Path) -> Result<usize> {
    let ca = read_pem(path, "reading [source.tls] ca_file")?;
    let mut found = 0;
    for cert in CertificateDer::pem_slice_iter(&ca) {
        let cert = cert
            .map_err(|e| Error::Invalid(format!("{}: not a PEM certificate: {e}", path.shown())))?;
        roots.add(cert).map_err(|e| {
            Error::Invalid(format!("{}: unusable CA certificate: {e}", path.shown()))
        })?;
        found += 1;
    }
    if found == 0 {
        return Err(Error::Invalid(format!(
            "{}: no certificate in it (PEM, \"-----BEGIN CERTIFICATE-----\")",
            path.shown()
        )));
    }
    Ok(found)
}

/// The client configuration trusting `roots`, with `files`' client certificate if it has one.
pub fn with_roots(roots: RootCertStore, files: Option<&TlsFiles>) -> Result<Arc<ClientConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Msg(format!("TLS: {e}")))?
        .with_root_certificates(roots);
    let client = files.map(|f| (&f.cert_file, &f.key_file));
    let config = match client {
        Some((Some(cert), Some(key))) => {
            let pem = read_pem(cert, "reading [source.tls] cert_file")?;
            let chain = CertificateDer::pem_slice_iter(&pem)
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| {
                    Error::Invalid(format!("{}: not a PEM certificate: {e}", cert.shown()))
                })?;
            let key_path = key;
            let key_pem = read_pem(key, "reading [source.tls] key_file")?;
            let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
                Error::Invalid(format!("{}: no private key in it: {e}", key.shown()))
            })?;
            builder.with_client_auth_cert(chain, key).map_err(|e| {
                let why = match format!("{e:?}") {
                    d if d.contains("UnsupportedCertVersion") => {
                        "an X.509 v1 certificate, which TLS clients refuse: issue a v3 one (openssl x509 -req ... -extfile with any extension)".to_string()
                    }
                    d if d.contains("KeyMismatch") || d.contains("InconsistentKeys") => {
                        "the key does not belong to the certificate".to_string()
                    }
                    _ => e.to_string(),
                };
                Error::Config(format!(
                    "[source.tls] cert_file \"{}\" with key_file \"{}\": {why}",
                    cert.shown(),
                    key_path.shown()
                ))
            })?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// Each configured server as a connection target: `host:port`, and TLS (configuration and
/// the name to verify) for a `tls://` one. Reads the certificate files once.
pub fn targets(
    servers: &[String],
    files: Option<&TlsFiles>,
) -> Result<Vec<(String, Option<TlsTarget>)>> {
    let config = match files {
        Some(f) if servers.iter().any(|s| s.starts_with(SCHEME)) => Some(client_config(f)?),
        _ => None,
    };
    let name = files.and_then(|f| f.server_name.as_deref());
    servers
        .iter()
        .map(|server| {
            let e = Endpoint::parse(server, name).map_err(Error::Config)?;
            let tls = match (e.tls, &config) {
                (Some(n), Some(c)) => Some((Arc::clone(c), n)),
                (Some(_), None) => {
                    return Err(Error::Config(format!(
                        "{server}: a tls:// server needs [source.tls] ca_file"
                    )))
                }
                (None, _) => None,
            };
            Ok((e.addr, tls))
        })
        .collect()
}

/// What a connection reads and writes.
pub enum Transport {
    Plain(TcpStream),
    Tls {
        conn: Box<ClientConnection>,
        sock: TcpStream,
    },
}

impl Transport {
    /// TLS over `sock` to `name`; the handshake happens as the first bytes are exchanged.
    pub fn tls(
        sock: TcpStream,
        config: &Arc<ClientConfig>,
        name: ServerName<'static>,
    ) -> io::Result<Transport> {
        let conn = ClientConnection::new(Arc::clone(config), name)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        Ok(Transport::Tls {
            conn: Box::new(conn),
            sock,
        })
    }

    pub fn tcp(&self) -> &TcpStream {
        match self {
            Transport::Plain(s) => s,
            Transport::Tls { sock, .. } => sock,
        }
    }

    /// TLS records waiting to be written (the socket was full, or the handshake has a say).
    pub fn wants_write(&self) -> bool {
        match self {
            Transport::Plain(_) => false,
            Transport::Tls { conn, .. } => conn.wants_write(),
        }
    }

    /// Decrypted bytes already received and not yet read (poll cannot see those).
    pub fn buffered(&mut self) -> bool {
        match self {
            Transport::Plain(_) => false,
            Transport::Tls { conn, .. } => conn
                .process_new_packets()
                .is_ok_and(|s| s.plaintext_bytes_to_read() > 0),
        }
    }

    /// Writes pending TLS records; Ok(false) when the socket would block.
    pub fn flush_tls(&mut self) -> io::Result<bool> {
        let Transport::Tls { conn, sock } = self else {
            return Ok(true);
        };
        while conn.wants_write() {
            match conn.write_tls(sock) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }
}

impl Read for Transport {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let (conn, sock) = match self {
            Transport::Plain(s) => return s.read(buf),
            Transport::Tls { conn, sock } => (conn, sock),
        };
        loop {
            match conn.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // Closed without close_notify: gearmand (and stunnel) just close.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            if conn.read_tls(sock)? == 0 {
                return Ok(0);
            }
            if let Err(e) = conn.process_new_packets() {
                // Send the alert that says why, if the socket takes it.
                let _ = conn.write_tls(sock);
                let hint = match e {
                    rustls::Error::AlertReceived(
                        rustls::AlertDescription::CertificateRequired,
                    ) => " (the server asks for a client certificate: [source.tls] cert_file and key_file)",
                    _ => "",
                };
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("TLS: {e}{hint}"),
                ));
            }
            // The handshake may have something to say back.
            while conn.wants_write() {
                match conn.write_tls(sock) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
        }
    }
}

impl Write for Transport {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = match self {
            Transport::Plain(s) => return s.write(buf),
            Transport::Tls { conn, .. } => conn.writer().write(buf)?,
        };
        self.flush_tls()?;
        if n == 0 && !buf.is_empty() {
            // rustls' buffer is full until the socket takes its records.
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Transport::Plain(s) => s.flush(),
            Transport::Tls { .. } => self.flush_tls().map(drop),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse() {
        let e = Endpoint::parse("10.0.0.1:4730", None).unwrap();
        assert_eq!((e.addr.as_str(), e.tls.is_none()), ("10.0.0.1:4730", true));
        let e = Endpoint::parse("tls://gm.example:4731", None).unwrap();
        assert_eq!(e.addr, "gm.example:4731");
        assert_eq!(e.tls, Some(ServerName::try_from("gm.example").unwrap()));
        let e = Endpoint::parse("tls://127.0.0.1:4731", Some("gearmand.internal")).unwrap();
        assert_eq!(
            e.tls,
            Some(ServerName::try_from("gearmand.internal").unwrap())
        );
        assert!(Endpoint::parse("tls://:4731", None).is_err());
        assert!(Endpoint::parse("host", None).is_err());
        assert!(Endpoint::parse("tls://host:99999", None).is_err());
    }
}
