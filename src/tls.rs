//! TLS: trust for every outbound connection (the API and the token endpoint: one rustls client
//! configuration, shared by `proxy` and `auth` so neither depends on the other for it), and the
//! proxy listener's own server configuration when `listen.tls_cert_file` is set (its identity,
//! ALPN, and the client certificates a gateway may identify callers by), built from its files
//! by [`InboundTls::load`] at start and again by `tls_reload` when they change. One crypto
//! backend, `ring`, for both directions.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use rustls::pki_types::CertificateDer;
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use serde::Serialize;
use zeroize::Zeroizing;

use crate::config::{Problem, MAX_SECRET_FILE};

/// Building the TLS configuration failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// rustls refused the protocol set or a certificate.
    #[error("TLS setup failed: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The rustls client configuration for every outbound TLS connection (API and token endpoint):
/// Mozilla's roots from webpki-roots plus any extra roots; certificates are always verified.
pub fn tls_config(
    extra_roots: &[CertificateDer<'static>],
) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for cert in extra_roots {
        roots.add(cert.clone())?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// Whether the proxy listener asks clients for a certificate it must have
/// (`listen.tls_client_auth`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// A client may present a certificate; one without still gets a connection (and must then
    /// authenticate with a key).
    #[default]
    Optional,
    /// A connection without a valid client certificate fails its handshake.
    Required,
}

/// The certificate a client presented on the proxy listener, verified against
/// `listen.tls_client_ca_file`: its leaf, as DER. Requests on that connection carry it as an
/// extension.
#[derive(Debug, Clone)]
pub struct ClientCert(pub Arc<CertificateDer<'static>>);

/// The rustls server configuration of the proxy listener: `chain` and `key` as the server's
/// identity, HTTP/2 and HTTP/1.1 offered by ALPN, and — with `client_roots` — client
/// certificates verified against those roots (asked for, and required with
/// [`ClientAuth::Required`]). The key must be the certificate's: a pair caught half-replaced
/// (a new certificate beside the old key) is refused, never served. A problem is keyed by the
/// file it concerns.
pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
    client_roots: Option<(&[CertificateDer<'static>], ClientAuth)>,
) -> Result<rustls::ServerConfig, Problem> {
    let problem = |key: &str, message: String| Problem {
        key: key.to_string(),
        message,
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| problem("listen", e.to_string()))?;
    let builder =
        match client_roots {
            None => builder.with_no_client_auth(),
            Some((roots, mode)) => {
                let mut store = rustls::RootCertStore::empty();
                for cert in roots {
                    store.add(cert.clone()).map_err(|e| {
                        problem(
                            CLIENT_CA_KEY,
                            format!("a client CA certificate is unusable: {e}"),
                        )
                    })?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    store.into(),
                    provider.clone(),
                );
                let verifier = match mode {
                    ClientAuth::Optional => verifier.allow_unauthenticated(),
                    ClientAuth::Required => verifier,
                };
                builder.with_client_cert_verifier(verifier.build().map_err(|e| {
                    problem(CLIENT_CA_KEY, format!("the client CAs are unusable: {e}"))
                })?)
            }
        };
    let mismatch = |e: rustls::Error| {
        problem(
            KEY_KEY,
            format!("the certificate and key do not make a server identity: {e}"),
        )
    };
    let signer = provider
        .key_provider
        .load_private_key(key)
        .map_err(mismatch)?;
    let identity = CertifiedKey::new(chain, signer);
    // rustls itself lets a key whose public half it cannot see pass; here it must match.
    identity.keys_match().map_err(mismatch)?;
    let mut config = builder.with_cert_resolver(Arc::new(SingleCertAndKey::from(identity)));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

const CERT_KEY: &str = "listen.tls_cert_file";
const KEY_KEY: &str = "listen.tls_key_file";
const CLIENT_CA_KEY: &str = "listen.tls_client_ca_file";

/// The files the proxy listener's TLS is built from (`listen.tls_*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundFiles {
    /// `listen.tls_cert_file`: the certificate chain, leaf first.
    pub cert: PathBuf,
    /// `listen.tls_key_file`: the leaf's private key.
    pub key: PathBuf,
    /// `listen.tls_client_ca_file`: the roots client certificates are verified against.
    pub client_ca: Option<PathBuf>,
    /// `listen.tls_client_auth`.
    pub client_auth: ClientAuth,
}

/// Where a file's path leads, its size and its modification time: what tells that its content
/// changed without reading it (`None` while it cannot be looked at).
pub type FileStamp = Option<(PathBuf, u64, Option<SystemTime>)>;

impl InboundFiles {
    /// The stamps of the files, in order (certificate, key, client CA). A path's canonical
    /// target is part of it, so a Kubernetes Secret update (a `..data` symlink swapped in the
    /// mounted directory) counts as a change even when size and time happen to agree.
    pub fn stamps(&self) -> Vec<FileStamp> {
        let mut paths = vec![&self.cert, &self.key];
        paths.extend(&self.client_ca);
        paths
            .into_iter()
            .map(|path| {
                let target = std::fs::canonicalize(path).ok()?;
                let meta = std::fs::metadata(&target).ok()?;
                Some((target, meta.len(), meta.modified().ok()))
            })
            .collect()
    }
}

/// The proxy listener's TLS as built from its files: the rustls configuration, what `/status`
/// shows of the certificate it presents, and what identifies the files it was read from.
#[derive(Debug, Clone)]
pub struct InboundTls {
    /// The files it was built from.
    pub files: InboundFiles,
    /// The server configuration new handshakes use.
    pub config: Arc<rustls::ServerConfig>,
    /// The certificate it presents.
    pub serving: ServingCert,
    /// The files' stamps, taken before they were read.
    pub stamps: Vec<FileStamp>,
    /// A digest of the bytes read (a touched but unchanged set is not a new one).
    pub digest: FilesDigest,
}

/// SHA-256 over the bytes of the files an [`InboundTls`] was read from (the key among them):
/// compared, never shown.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct FilesDigest([u8; 32]);

impl std::fmt::Debug for FilesDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FilesDigest(..)")
    }
}

/// The certificate the listener presents, as `/status` shows it (public information).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServingCert {
    /// SHA-256 of the leaf certificate's DER, lower-case hex (`openssl x509 -fingerprint
    /// -sha256` without the colons).
    pub sha256: String,
    /// When the leaf certificate expires (RFC 3339, UTC); absent when it cannot be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_after: Option<String>,
}

impl ServingCert {
    /// What is shown of the leaf certificate `der`.
    pub fn of(der: &[u8]) -> Self {
        Self {
            sha256: crate::gateway::sha256(der)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
            not_after: crate::gateway::cert::not_after(der),
        }
    }
}

impl InboundTls {
    /// Reads the files and builds the listener's TLS from them, as at start; every problem,
    /// keyed by the file it concerns, when they do not make one (a file missing, unreadable or
    /// not PEM, a key that is not the certificate's, an unusable client CA). Messages name
    /// files, never quote them; the key's bytes are wiped once parsed.
    pub fn load(files: &InboundFiles) -> Result<InboundTls, Vec<Problem>> {
        let stamps = files.stamps();
        let mut problems = Vec::new();
        let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
        let mut read = |key: &str, path: &Path, what: &str, problems: &mut Vec<Problem>| {
            let bytes = noted(
                problems,
                key,
                crate::config::read_small_file(path, MAX_SECRET_FILE, what),
            )
            .map(Zeroizing::new);
            // A file that cannot be read counts as one of no bytes.
            let len = bytes.as_ref().map_or(0, |b| b.len());
            digest.update(&(len as u64).to_be_bytes());
            digest.update(bytes.as_deref().map_or(&[][..], Vec::as_slice));
            bytes
        };
        let cert = read(CERT_KEY, &files.cert, "certificate file", &mut problems);
        let key = read(KEY_KEY, &files.key, "key file", &mut problems);
        let client_ca = files
            .client_ca
            .as_deref()
            .map(|path| (path, read(CLIENT_CA_KEY, path, "CA file", &mut problems)));
        let chain = cert.and_then(|b| {
            let chain = crate::config::pem_certificates(&files.cert, &b);
            noted(&mut problems, CERT_KEY, chain)
        });
        let key = key.and_then(|b| {
            let key = crate::config::pem_private_key(&files.key, &b);
            noted(&mut problems, KEY_KEY, key)
        });
        let roots = client_ca.map(|(path, bytes)| {
            bytes.and_then(|b| {
                let roots = crate::config::pem_certificates(path, &b);
                noted(&mut problems, CLIENT_CA_KEY, roots)
            })
        });
        // Every file read and parsed when nothing was reported.
        let (Some(chain), Some(key), true) = (chain, key, problems.is_empty()) else {
            return Err(problems);
        };
        let roots = roots.flatten();
        let serving = chain
            .first()
            .map(|leaf| ServingCert::of(leaf))
            .ok_or_else(|| {
                vec![Problem {
                    key: CERT_KEY.to_string(),
                    message: format!("{} holds no certificate", files.cert.display()),
                }]
            })?;
        let client = roots.as_deref().map(|r| (r, files.client_auth));
        let config = server_config(chain, key, client).map_err(|p| vec![p])?;
        let mut sum = [0u8; 32];
        sum.copy_from_slice(digest.finish().as_ref());
        Ok(InboundTls {
            files: files.clone(),
            config: Arc::new(config),
            serving,
            stamps,
            digest: FilesDigest(sum),
        })
    }
}

/// `result`'s value, or `None` with its message noted as a problem of `key`.
fn noted<T>(problems: &mut Vec<Problem>, key: &str, result: Result<T, String>) -> Option<T> {
    result
        .map_err(|message| {
            problems.push(Problem {
                key: key.to_string(),
                message,
            })
        })
        .ok()
}
