//! TLS for NBD, configured like QEMU's `tls-creds-x509` and `tls-creds-psk` objects.
//!
//! X.509 runs on rustls with the `ring` provider. The credentials directory holds
//! `ca-cert.pem` (always), `server-cert.pem` + `server-key.pem` (endpoint `server`) or the
//! optional `client-cert.pem` + `client-key.pem` (endpoint `client`), and an optional
//! `ca-crl.pem` (server). With `verify-peer` (the default) a server requires a client
//! certificate signed by the CA, and a client checks the server's certificate against the CA
//! and the host name.
//!
//! PSK (feature `tls-psk`, on by default) runs on OpenSSL, since rustls has no external
//! pre-shared keys: `keys.psk` holds `username:hexkey` lines; a server accepts every listed
//! identity, a client presents `username` (default `qemu`).

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::future::BoxFuture;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime,
};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use serde_json::{Map, Value};

use crate::authz::Authorizer;
use crate::client::TlsConnect;
use crate::server::{BoxStream, TlsHook};

/// Which side of a connection the credentials are for (QEMU's `endpoint`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// A server (NBD server, `qemu-nbd`).
    Server,
    /// A client (the `nbd` block driver).
    Client,
}

impl Endpoint {
    fn parse(s: &str) -> Result<Endpoint, String> {
        match s {
            "server" => Ok(Endpoint::Server),
            "client" => Ok(Endpoint::Client),
            _ => Err(format!("Parameter 'endpoint' does not accept value '{s}'")),
        }
    }
}

enum Kind {
    X509 {
        server: Option<Arc<ServerConfig>>,
        client: Option<Arc<ClientConfig>>,
    },
    #[cfg(feature = "tls-psk")]
    Psk(psk::PskCreds),
}

/// Loaded TLS credentials (one `tls-creds-*` object).
pub struct TlsCreds {
    endpoint: Endpoint,
    verify_peer: bool,
    kind: Kind,
}

impl fmt::Debug for TlsCreds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            Kind::X509 { .. } => "x509",
            #[cfg(feature = "tls-psk")]
            Kind::Psk(_) => "psk",
        };
        f.debug_struct("TlsCreds")
            .field("kind", &kind)
            .field("endpoint", &self.endpoint)
            .field("verify_peer", &self.verify_peer)
            .finish()
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// QEMU's `strerror`-style text for an I/O error.
fn io_text(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => strata_core::error::strerror(n),
        None => e.to_string(),
    }
}

/// `dir/name`, which must be readable when `required` (QEMU's `qcrypto_tls_creds_get_path`).
fn cred_path(dir: &Path, name: &str, required: bool) -> Result<Option<PathBuf>, String> {
    let p = dir.join(name);
    match std::fs::File::open(&p) {
        Ok(_) => Ok(Some(p)),
        Err(e) if !required && e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!(
            "Unable to access credentials {}: {}",
            p.display(),
            io_text(&e)
        )),
    }
}

fn load_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("Unable to import {what} {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "Unable to import {what} {}: no certificate found",
            path.display()
        ));
    }
    Ok(certs)
}

fn load_key(cert: &Path, key: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(key).map_err(|e| {
        format!(
            "Cannot load certificate '{}' & key '{}': {e}",
            cert.display(),
            key.display()
        )
    })
}

fn load_roots(path: &Path) -> Result<Arc<RootCertStore>, String> {
    let mut roots = RootCertStore::empty();
    for c in load_certs(path, "CA certificate list")? {
        roots
            .add(c)
            .map_err(|e| format!("Cannot load CA certificate '{}': {e}", path.display()))?;
    }
    Ok(Arc::new(roots))
}

/// Parse a QOM boolean: JSON `true`/`false` or the command line's `on`/`off`.
fn prop_bool(props: &Map<String, Value>, key: &str, default: bool) -> Result<bool, String> {
    match props.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(Value::String(s)) => match s.as_str() {
            "on" | "yes" | "true" | "y" => Ok(true),
            "off" | "no" | "false" | "n" => Ok(false),
            _ => Err(format!("Parameter '{key}' expects 'on' or 'off'")),
        },
        Some(_) => Err(format!(
            "Invalid parameter type for '{key}', expected: boolean"
        )),
    }
}

impl TlsCreds {
    /// Load `tls-creds-x509` credentials from `dir`.
    pub fn load_x509(
        dir: &Path,
        endpoint: Endpoint,
        verify_peer: bool,
    ) -> Result<TlsCreds, String> {
        let provider = provider();
        let ca = cred_path(dir, "ca-cert.pem", true)?.expect("required");
        let kind = match endpoint {
            Endpoint::Server => {
                let crl = cred_path(dir, "ca-crl.pem", false)?;
                let cert = cred_path(dir, "server-cert.pem", true)?.expect("required");
                let key = cred_path(dir, "server-key.pem", true)?.expect("required");
                let roots = load_roots(&ca)?;
                let chain = load_certs(&cert, "server certificate")?;
                let key_der = load_key(&cert, &key)?;
                let builder = ServerConfig::builder_with_provider(provider.clone())
                    .with_safe_default_protocol_versions()
                    .map_err(|e| e.to_string())?;
                let builder = if verify_peer {
                    let mut vb = WebPkiClientVerifier::builder_with_provider(roots, provider);
                    if let Some(crl) = &crl {
                        let crls = CertificateRevocationListDer::pem_file_iter(crl)
                            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                            .map_err(|e| format!("Cannot load CRL '{}': {e}", crl.display()))?;
                        vb = vb.with_crls(crls);
                    }
                    let v = vb.build().map_err(|e| {
                        format!("Cannot load CA certificate '{}': {e}", ca.display())
                    })?;
                    builder.with_client_cert_verifier(v)
                } else {
                    builder.with_no_client_auth()
                };
                let cfg = builder.with_single_cert(chain, key_der).map_err(|e| {
                    format!(
                        "Cannot load certificate '{}' & key '{}': {e}",
                        cert.display(),
                        key.display()
                    )
                })?;
                Kind::X509 {
                    server: Some(Arc::new(cfg)),
                    client: None,
                }
            }
            Endpoint::Client => {
                let cert = cred_path(dir, "client-cert.pem", false)?;
                let key = cred_path(dir, "client-key.pem", false)?;
                let roots = load_roots(&ca)?;
                let builder = ClientConfig::builder_with_provider(provider.clone())
                    .with_safe_default_protocol_versions()
                    .map_err(|e| e.to_string())?;
                let builder = if verify_peer {
                    builder.with_root_certificates(roots)
                } else {
                    builder
                        .dangerous()
                        .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
                };
                let cfg = match (cert, key) {
                    (Some(cert), Some(key)) => {
                        let chain = load_certs(&cert, "client certificate")?;
                        let key_der = load_key(&cert, &key)?;
                        builder.with_client_auth_cert(chain, key_der).map_err(|e| {
                            format!(
                                "Cannot load certificate '{}' & key '{}': {e}",
                                cert.display(),
                                key.display()
                            )
                        })?
                    }
                    _ => builder.with_no_client_auth(),
                };
                Kind::X509 {
                    server: None,
                    client: Some(Arc::new(cfg)),
                }
            }
        };
        Ok(TlsCreds {
            endpoint,
            verify_peer,
            kind,
        })
    }

    /// Load `tls-creds-psk` credentials: `dir/keys.psk`; a client uses `username`'s key.
    #[cfg(feature = "tls-psk")]
    pub fn load_psk(
        dir: &Path,
        endpoint: Endpoint,
        username: Option<&str>,
    ) -> Result<TlsCreds, String> {
        let path = cred_path(dir, "keys.psk", true)?.expect("required");
        let creds = psk::PskCreds::load(&path, endpoint, username)?;
        Ok(TlsCreds {
            endpoint,
            verify_peer: true,
            kind: Kind::Psk(creds),
        })
    }

    /// Load the credentials a QOM object describes: `qom_type` is `tls-creds-x509` or
    /// `tls-creds-psk`, `props` its properties (`dir`, `endpoint`, `verify-peer`,
    /// `username`), as JSON values or command-line strings.
    pub fn from_object(qom_type: &str, props: &Map<String, Value>) -> Result<TlsCreds, String> {
        let endpoint = Endpoint::parse(
            props
                .get("endpoint")
                .and_then(Value::as_str)
                .unwrap_or("client"),
        )?;
        let verify_peer = prop_bool(props, "verify-peer", true)?;
        let Some(dir) = props.get("dir").and_then(Value::as_str) else {
            return Err("Missing 'dir' property value".into());
        };
        let dir = Path::new(dir);
        match qom_type {
            "tls-creds-x509" => Self::load_x509(dir, endpoint, verify_peer),
            #[cfg(feature = "tls-psk")]
            "tls-creds-psk" => {
                Self::load_psk(dir, endpoint, props.get("username").and_then(Value::as_str))
            }
            other => Err(format!(
                "TLS credentials of type '{other}' are not supported"
            )),
        }
    }

    /// The endpoint the credentials were made for.
    pub fn endpoint(&self) -> Endpoint {
        self.endpoint
    }

    /// Whether the peer is verified (`verify-peer`).
    pub fn verify_peer(&self) -> bool {
        self.verify_peer
    }

    /// The hook an [`crate::NbdServer`] runs `NBD_OPT_STARTTLS` with. The credentials must
    /// be for a server (QEMU's "Expected TLS credentials for a server endpoint").
    pub fn server_hook(&self) -> Result<Arc<dyn TlsHook>, String> {
        self.server_hook_with_authz(None)
    }

    /// [`Self::server_hook`] that, after the handshake, drops a client whose identity
    /// (certificate DN or PSK username) `authz` does not allow (QEMU's `tls-authz`).
    pub fn server_hook_with_authz(
        &self,
        authz: Option<Arc<dyn Authorizer>>,
    ) -> Result<Arc<dyn TlsHook>, String> {
        if self.endpoint != Endpoint::Server {
            return Err("Expected TLS credentials for a server endpoint".into());
        }
        match &self.kind {
            Kind::X509 {
                server: Some(cfg), ..
            } => Ok(Arc::new(RustlsServer {
                acceptor: tokio_rustls::TlsAcceptor::from(cfg.clone()),
                authz,
            })),
            Kind::X509 { .. } => Err("Expected TLS credentials for a server endpoint".into()),
            #[cfg(feature = "tls-psk")]
            Kind::Psk(p) => p.server_hook(authz),
        }
    }

    /// The client side: what [`crate::ClientOptions::tls`] takes. `hostname` is the name
    /// the server's certificate must carry (QEMU's `tls-hostname`, by default the host of a
    /// TCP address; a Unix socket needs it given). The credentials must be for a client.
    pub fn client_connector(&self, hostname: Option<&str>) -> Result<Arc<dyn TlsConnect>, String> {
        if self.endpoint != Endpoint::Client {
            return Err("Expected TLS credentials for a client endpoint".into());
        }
        match &self.kind {
            Kind::X509 {
                client: Some(cfg), ..
            } => {
                let name = match hostname {
                    Some(h) => Some(
                        ServerName::try_from(h.to_string())
                            .map_err(|_| format!("Invalid TLS hostname '{h}'"))?,
                    ),
                    None => None,
                };
                Ok(Arc::new(RustlsClient {
                    connector: tokio_rustls::TlsConnector::from(cfg.clone()),
                    name,
                    verify: self.verify_peer,
                }))
            }
            Kind::X509 { .. } => Err("Expected TLS credentials for a client endpoint".into()),
            #[cfg(feature = "tls-psk")]
            Kind::Psk(p) => p.client_connector(),
        }
    }
}

/// Server side of X.509 TLS.
struct RustlsServer {
    acceptor: tokio_rustls::TlsAcceptor,
    authz: Option<Arc<dyn Authorizer>>,
}

/// Runs `authz` on a peer's identity. A refusal is logged as QEMU's server logs it
/// (`<prog>: option negotiation failed: TLS x509 authz check for .. is denied`), since the
/// client only sees the connection close.
fn authorize(authz: &dyn Authorizer, kind: &str, identity: &str) -> io::Result<()> {
    let msg = match authz.check(identity) {
        Ok(true) => return Ok(()),
        Ok(false) => format!("TLS {kind} authz check for {identity} is denied"),
        Err(e) => e,
    };
    let prog = std::env::args()
        .next()
        .and_then(|a| {
            Path::new(&a)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        })
        .unwrap_or_default();
    eprintln!("{prog}: option negotiation failed: {msg}");
    Err(io::Error::new(io::ErrorKind::PermissionDenied, msg))
}

impl TlsHook for RustlsServer {
    fn wrap(&self, stream: BoxStream) -> BoxFuture<'static, io::Result<BoxStream>> {
        let acceptor = self.acceptor.clone();
        let authz = self.authz.clone();
        Box::pin(async move {
            let s = acceptor.accept(stream).await?;
            if let Some(authz) = authz {
                let Some(cert) = s.get_ref().1.peer_certificates().and_then(|c| c.first()) else {
                    return Err(io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        "No certificate peer credentials",
                    ));
                };
                authorize(authz.as_ref(), "x509", &dn::subject_dn(cert)?)?;
            }
            Ok(Box::new(s) as BoxStream)
        })
    }
}

/// The subject DN of a certificate, printed as GnuTLS's `gnutls_x509_crt_get_dn` does
/// (attribute names and escaping as RFC 4514, RDNs in the certificate's order).
#[cfg(feature = "tls-psk")]
mod dn {
    use std::io;

    use openssl::nid::Nid;
    use openssl::x509::X509;
    use rustls::pki_types::CertificateDer;

    /// GnuTLS's short names for the common attribute types (others print as dotted OIDs).
    fn attr_name(nid: Nid) -> Option<&'static str> {
        Some(match nid {
            Nid::COMMONNAME => "CN",
            Nid::ORGANIZATIONNAME => "O",
            Nid::ORGANIZATIONALUNITNAME => "OU",
            Nid::COUNTRYNAME => "C",
            Nid::LOCALITYNAME => "L",
            Nid::STATEORPROVINCENAME => "ST",
            Nid::DOMAINCOMPONENT => "DC",
            Nid::USERID => "UID",
            Nid::PKCS9_EMAILADDRESS => "EMAIL",
            Nid::SERIALNUMBER => "serialNumber",
            Nid::TITLE => "title",
            Nid::SURNAME => "surName",
            Nid::GIVENNAME => "givenName",
            _ => return None,
        })
    }

    /// RFC 4514 escaping of an attribute value.
    fn escape(v: &str, out: &mut String) {
        let last = v.chars().count().saturating_sub(1);
        for (i, c) in v.chars().enumerate() {
            let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
                || (i == 0 && (c == '#' || c == ' '))
                || (i == last && c == ' ');
            if special {
                out.push('\\');
            }
            out.push(c);
        }
    }

    pub(super) fn subject_dn(cert: &CertificateDer<'_>) -> io::Result<String> {
        let x = X509::from_der(cert).map_err(io::Error::other)?;
        let entries: Vec<_> = x.subject_name().entries().collect();
        let mut out = String::new();
        // GnuTLS 3.x's `gnutls_x509_crt_get_dn` keeps the encoded order (`C=GB,O=..,CN=..`),
        // not RFC 4514's reversed one; QEMU 10.0.2 with it is the reference.
        for e in &entries {
            if !out.is_empty() {
                out.push(',');
            }
            let nid = e.object().nid();
            match attr_name(nid) {
                Some(n) => out.push_str(n),
                None => out.push_str(&e.object().to_string()),
            }
            out.push('=');
            let v = e.data().to_string().map_err(io::Error::other)?;
            escape(&v, &mut out);
        }
        Ok(out)
    }
}

#[cfg(not(feature = "tls-psk"))]
mod dn {
    use std::io;

    use rustls::pki_types::CertificateDer;

    pub(super) fn subject_dn(_cert: &CertificateDer<'_>) -> io::Result<String> {
        Err(io::Error::other(
            "TLS client authorisation needs the tls-psk feature (OpenSSL)",
        ))
    }
}

/// Client side of X.509 TLS.
struct RustlsClient {
    connector: tokio_rustls::TlsConnector,
    name: Option<ServerName<'static>>,
    verify: bool,
}

impl fmt::Debug for RustlsClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RustlsClient")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl TlsConnect for RustlsClient {
    fn connect(&self, stream: BoxStream) -> BoxFuture<'static, io::Result<BoxStream>> {
        let connector = self.connector.clone();
        let name = match (&self.name, self.verify) {
            (Some(n), _) => Ok(n.clone()),
            // Nothing is checked against the name then; SNI needs one all the same.
            (None, false) => Ok(ServerName::try_from("localhost").expect("valid name")),
            (None, true) => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "No hostname for certificate validation",
            )),
        };
        Box::pin(async move {
            let s = connector.connect(name?, stream).await?;
            Ok(Box::new(s) as BoxStream)
        })
    }
}

/// `verify-peer=off` on a client: the server's certificate is not checked (its handshake
/// signature still is).
#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(feature = "tls-psk")]
mod psk {
    //! `tls-creds-psk` on OpenSSL.

    use std::collections::HashMap;
    use std::fmt;
    use std::io;
    use std::path::Path;
    use std::pin::Pin;
    use std::sync::Arc;

    use futures::future::BoxFuture;
    use std::sync::OnceLock;

    use openssl::error::ErrorStack;
    use openssl::ex_data::Index;
    use openssl::ssl::{Ssl, SslContext, SslContextBuilder, SslMethod, SslVerifyMode};

    use super::Endpoint;
    use crate::authz::Authorizer;
    use crate::client::TlsConnect;
    use crate::server::{BoxStream, TlsHook};

    /// TLS 1.2 PSK suites GnuTLS (QEMU's `+ECDHE-PSK:+DHE-PSK:+PSK`) and OpenSSL share;
    /// TLS 1.3 uses external PSKs through the same callbacks.
    const CIPHERS: &str = "ECDHE-PSK:DHE-PSK:PSK";

    pub(super) struct PskCreds {
        /// A client whose user has no key fails when it connects, as QEMU's does.
        ctx: Result<SslContext, String>,
        endpoint: Endpoint,
    }

    fn hex(s: &str) -> Option<Vec<u8>> {
        if !s.len().is_multiple_of(2) {
            return None;
        }
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
            .collect()
    }

    fn ssl_err(e: impl fmt::Display) -> String {
        format!("Cannot set up TLS PSK credentials: {e}")
    }

    impl PskCreds {
        pub(super) fn load(
            path: &Path,
            endpoint: Endpoint,
            username: Option<&str>,
        ) -> Result<PskCreds, String> {
            let text = std::fs::read_to_string(path).map_err(|e| {
                format!("Unable to read {}: {}", path.display(), super::io_text(&e))
            })?;
            let mut keys: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
            for line in text.lines() {
                let line = line.trim_end_matches('\r');
                if line.is_empty() {
                    continue;
                }
                let Some((user, key)) = line.split_once(':') else {
                    return Err(format!("Invalid key in {}", path.display()));
                };
                let key =
                    hex(key.trim()).ok_or_else(|| format!("Invalid key in {}", path.display()))?;
                keys.entry(user.as_bytes().to_vec()).or_insert(key);
            }
            let mut b = SslContextBuilder::new(SslMethod::tls()).map_err(ssl_err)?;
            b.set_cipher_list(CIPHERS).map_err(ssl_err)?;
            b.set_verify(SslVerifyMode::NONE);
            match endpoint {
                Endpoint::Server => {
                    let keys = Arc::new(keys);
                    b.set_psk_server_callback(move |ssl, identity, out| {
                        // Kept for the authz check after the handshake.
                        if let (Some(id), Ok(idx)) = (identity, identity_index()) {
                            ssl.set_ex_data(idx, String::from_utf8_lossy(id).into_owned());
                        }
                        let key = identity.and_then(|id| keys.get(id));
                        match key {
                            Some(k) if k.len() <= out.len() => {
                                out[..k.len()].copy_from_slice(k);
                                Ok(k.len())
                            }
                            _ => Ok(0),
                        }
                    });
                }
                Endpoint::Client => {
                    let user = username.unwrap_or("qemu");
                    let Some(key) = keys.get(user.as_bytes()).cloned() else {
                        return Ok(PskCreds {
                            ctx: Err(format!(
                                "Username {user} not found in PSK file {}",
                                path.display()
                            )),
                            endpoint,
                        });
                    };
                    let user = user.as_bytes().to_vec();
                    b.set_psk_client_callback(move |_ssl, _hint, identity, out| {
                        if user.len() + 1 > identity.len() || key.len() > out.len() {
                            return Ok(0);
                        }
                        identity[..user.len()].copy_from_slice(&user);
                        identity[user.len()] = 0;
                        out[..key.len()].copy_from_slice(&key);
                        Ok(key.len())
                    });
                }
            }
            Ok(PskCreds {
                ctx: Ok(b.build()),
                endpoint,
            })
        }

        pub(super) fn server_hook(
            &self,
            authz: Option<Arc<dyn Authorizer>>,
        ) -> Result<Arc<dyn TlsHook>, String> {
            debug_assert_eq!(self.endpoint, Endpoint::Server);
            Ok(Arc::new(OpensslPskServer {
                ctx: self.ctx.clone()?,
                authz,
            }))
        }

        pub(super) fn client_connector(&self) -> Result<Arc<dyn TlsConnect>, String> {
            debug_assert_eq!(self.endpoint, Endpoint::Client);
            Ok(Arc::new(OpensslPsk(self.ctx.clone()?)))
        }
    }

    struct OpensslPsk(SslContext);

    impl fmt::Debug for OpensslPsk {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("OpensslPsk")
        }
    }

    fn stream(ctx: &SslContext, s: BoxStream) -> io::Result<tokio_openssl::SslStream<BoxStream>> {
        let ssl = Ssl::new(ctx).map_err(io::Error::other)?;
        tokio_openssl::SslStream::new(ssl, s).map_err(io::Error::other)
    }

    /// The `Ssl` slot the server's PSK callback stores the client's username in.
    fn identity_index() -> Result<Index<Ssl, String>, ErrorStack> {
        static INDEX: OnceLock<Result<Index<Ssl, String>, ErrorStack>> = OnceLock::new();
        INDEX.get_or_init(Ssl::new_ex_index).clone()
    }

    struct OpensslPskServer {
        ctx: SslContext,
        authz: Option<Arc<dyn Authorizer>>,
    }

    impl TlsHook for OpensslPskServer {
        fn wrap(&self, s: BoxStream) -> BoxFuture<'static, io::Result<BoxStream>> {
            let r = stream(&self.ctx, s);
            let authz = self.authz.clone();
            Box::pin(async move {
                let mut s = r?;
                Pin::new(&mut s).accept().await.map_err(io::Error::other)?;
                if let Some(authz) = authz {
                    let idx = identity_index().map_err(io::Error::other)?;
                    let user = s.ssl().ex_data(idx).cloned().unwrap_or_default();
                    super::authorize(authz.as_ref(), "PSK", &user)?;
                }
                Ok(Box::new(s) as BoxStream)
            })
        }
    }

    impl TlsConnect for OpensslPsk {
        fn connect(&self, s: BoxStream) -> BoxFuture<'static, io::Result<BoxStream>> {
            let r = stream(&self.0, s);
            Box::pin(async move {
                let mut s = r?;
                Pin::new(&mut s).connect().await.map_err(io::Error::other)?;
                Ok(Box::new(s) as BoxStream)
            })
        }
    }
}
