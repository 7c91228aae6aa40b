//! The ways a store reaches the gateway, so one guardrail test runs over each: plain HTTP/1.1,
//! and HTTPS (the listener's TLS with the test CA's client certificates) over HTTP/1.1 or HTTP/2
//! by ALPN, the store identified by its key or, over HTTPS, by its client certificate.
//!
//! * [`Way`] names one of them; [`Front`] sets a gateway up for it: the `[listen]` TLS keys,
//!   the lines identifying each caller (`key_sha256`, or `cert_san` / `cert_sha256`), the base
//!   URL, and a [`Store`] client per caller.
//! * [`Store::exchange`] sends a request exactly as written — a raw HTTP/1.1 request line on
//!   plain TCP or TLS, or a raw `:path` (and `:authority`) with the `h2` client — for the tricks
//!   an ordinary client would normalise or refuse to send.
//! * [`Ca`], [`Identity`], [`TlsFiles`], [`tls_client`] and [`https`] are the private CA,
//!   certificates and TLS clients every inbound-TLS test uses.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair, SanType};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::raw::{parse_responses, RawResponse};
use super::{sha256_hex, TestProxy};

/// A certificate authority: its certificate (PEM) and what signs with it.
pub struct Ca {
    pub pem: String,
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    pub fn new() -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        Ca {
            pem: cert.pem(),
            cert,
            key,
        }
    }

    /// A client certificate carrying `sans` (a name with `:` is a URI), optionally long expired.
    pub fn client(&self, sans: &[&str], expired: bool) -> Identity {
        let sans = sans
            .iter()
            .map(|san| {
                let value = rcgen::Ia5String::try_from(*san).unwrap();
                if san.contains(':') {
                    SanType::URI(value)
                } else {
                    SanType::DnsName(value)
                }
            })
            .collect();
        self.client_with(sans, expired)
    }

    /// A client certificate carrying exactly `sans`, optionally long expired.
    pub fn client_with(&self, sans: Vec<SanType>, expired: bool) -> Identity {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = sans;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        Identity {
            der: cert.der().to_vec(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// A server certificate for 127.0.0.1 and localhost.
    pub fn server(&self) -> Identity {
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        Identity {
            der: cert.der().to_vec(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }
}

/// A certificate and its key.
pub struct Identity {
    pub der: Vec<u8>,
    pub cert_pem: String,
    pub key_pem: String,
}

impl Identity {
    /// The fingerprint as `openssl x509 -noout -fingerprint -sha256` prints it.
    pub fn openssl_fingerprint(&self) -> String {
        sha256_hex(&self.der)
            .to_ascii_uppercase()
            .as_bytes()
            .chunks(2)
            .map(|p| std::str::from_utf8(p).unwrap())
            .collect::<Vec<_>>()
            .join(":")
    }
}

/// The files a TLS listener is configured with, in a directory that lives as long as this.
pub struct TlsFiles {
    pub dir: tempfile::TempDir,
    pub ca: Ca,
}

impl TlsFiles {
    pub fn new() -> TlsFiles {
        let ca = Ca::new();
        let dir = tempfile::tempdir().unwrap();
        let server = ca.server();
        std::fs::write(dir.path().join("server.pem"), &server.cert_pem).unwrap();
        std::fs::write(dir.path().join("server.key"), &server.key_pem).unwrap();
        std::fs::write(dir.path().join("clients-ca.pem"), &ca.pem).unwrap();
        TlsFiles { dir, ca }
    }

    pub fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    /// `[listen]` keys for TLS; with client certificates verified when `mtls`.
    pub fn listen_keys(&self, mtls: bool) -> String {
        let mut keys = format!(
            "tls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n",
            self.path("server.pem"),
            self.path("server.key")
        );
        if mtls {
            keys += &format!("tls_client_ca_file = \"{}\"\n", self.path("clients-ca.pem"));
        }
        keys
    }
}

/// A rustls client trusting `ca_pem`, presenting `identity` when given, offering `alpn`.
pub fn tls_client(
    ca_pem: &str,
    identity: Option<&Identity>,
    alpn: &[&[u8]],
) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match identity {
        Some(id) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(id.cert_pem.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(id.key_pem.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config
}

/// An HTTP client over TLS: HTTP/2 (ALPN `h2`) or HTTP/1.1 (ALPN `http/1.1`).
pub fn https(ca_pem: &str, identity: Option<&Identity>, h2: bool) -> reqwest::Client {
    let alpn: &[&[u8]] = if h2 { &[b"h2"] } else { &[b"http/1.1"] };
    let builder = reqwest::Client::builder()
        .use_preconfigured_tls(tls_client(ca_pem, identity, alpn))
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10));
    let builder = if h2 {
        builder.http2_prior_knowledge()
    } else {
        builder.http1_only()
    };
    builder.build().unwrap()
}

/// What carries a store's requests to the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// HTTP/1.1 over plain TCP.
    Plain,
    /// HTTP/1.1 over TLS (ALPN `http/1.1`).
    Https1,
    /// HTTP/2 over TLS (ALPN `h2`).
    Https2,
}

/// How the gateway knows which store is calling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentifiedBy {
    /// `Authorization: Basic NAME:KEY` against the caller's `key_sha256`.
    Key,
    /// The TLS client certificate: callers configured alternately by `cert_sha256` and by
    /// `cert_san`, so both matchers face every guardrail. No credential header is sent.
    Cert,
}

/// One way a store reaches the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Way {
    pub transport: Transport,
    pub by: IdentifiedBy,
}

impl Way {
    pub const PLAIN_KEY: Way = Way::new(Transport::Plain, IdentifiedBy::Key);
    pub const HTTPS1_KEY: Way = Way::new(Transport::Https1, IdentifiedBy::Key);
    pub const HTTPS1_CERT: Way = Way::new(Transport::Https1, IdentifiedBy::Cert);
    pub const HTTPS2_KEY: Way = Way::new(Transport::Https2, IdentifiedBy::Key);
    pub const HTTPS2_CERT: Way = Way::new(Transport::Https2, IdentifiedBy::Cert);

    const fn new(transport: Transport, by: IdentifiedBy) -> Way {
        Way { transport, by }
    }

    /// The protocol answers must come in.
    pub fn version(&self) -> reqwest::Version {
        match self.transport {
            Transport::Https2 => reqwest::Version::HTTP_2,
            _ => reqwest::Version::HTTP_11,
        }
    }
}

/// A gateway's listener set up for one [`Way`]. Lives as long as the gateway (it holds the
/// listener's certificate files).
pub struct Front {
    pub way: Way,
    tls: Option<TlsFiles>,
    /// Client certificates by caller name, in the order the callers were configured.
    certs: Mutex<Vec<(String, Arc<Identity>)>>,
}

impl Front {
    pub fn new(way: Way) -> Front {
        let tls = (way.transport != Transport::Plain).then(TlsFiles::new);
        assert!(
            tls.is_some() || way.by == IdentifiedBy::Key,
            "client certificates need TLS"
        );
        Front {
            way,
            tls,
            certs: Mutex::new(Vec::new()),
        }
    }

    /// `[listen]` keys: TLS with client certificates verified against the test CA (optional,
    /// so key-identified stores connect without one), or none for plain HTTP.
    pub fn listen_keys(&self) -> String {
        self.tls
            .as_ref()
            .map(|t| t.listen_keys(true))
            .unwrap_or_default()
    }

    /// `toml` (a config with a `[listen]` table) with this way's listener keys added.
    pub fn configure(&self, toml: &str) -> String {
        assert!(toml.contains("[listen]\n"), "{toml}");
        toml.replacen(
            "[listen]\n",
            &format!("[listen]\n{}", self.listen_keys()),
            1,
        )
    }

    /// The `[callers.NAME]` lines that identify caller `name`, whose key is `key`.
    pub fn identity_keys(&self, name: &str, key: &str) -> String {
        match self.way.by {
            IdentifiedBy::Key => format!("key_sha256 = \"{}\"\n", sha256_hex(key.as_bytes())),
            IdentifiedBy::Cert => {
                let (index, cert) = self.cert(name);
                if index % 2 == 0 {
                    format!("cert_san = \"{}\"\n", san(name))
                } else {
                    format!("cert_sha256 = \"{}\"\n", cert.openssl_fingerprint())
                }
            }
        }
    }

    /// The client certificate of caller `name` (made on first use) and its place in the order.
    fn cert(&self, name: &str) -> (usize, Arc<Identity>) {
        let ca = &self.tls.as_ref().expect("client certificates need TLS").ca;
        let mut certs = self.certs.lock().unwrap();
        if let Some(i) = certs.iter().position(|(n, _)| n == name) {
            return (i, certs[i].1.clone());
        }
        certs.push((name.to_string(), Arc::new(ca.client(&[&san(name)], false))));
        (certs.len() - 1, certs[certs.len() - 1].1.clone())
    }

    /// The gateway's base URL for this transport.
    pub fn base(&self, proxy: &TestProxy) -> String {
        match self.tls {
            Some(_) => format!("https://{}", proxy.addr()),
            None => proxy.url.clone(),
        }
    }

    /// A client for caller `name` with key `key`: it sends the key, or presents the caller's
    /// certificate, as this way identifies stores.
    pub fn store(&self, name: &str, key: &str) -> Store {
        let identity = match self.way.by {
            IdentifiedBy::Key => None,
            IdentifiedBy::Cert => Some(self.cert(name).1),
        };
        let auth = match self.way.by {
            IdentifiedBy::Key => Some(basic(name, key)),
            IdentifiedBy::Cert => None,
        };
        Store {
            client: self.client(identity.as_deref()),
            auth,
            identity,
            way: self.way,
            ca_pem: self.tls.as_ref().map(|t| t.ca.pem.clone()),
        }
    }

    /// A client of this transport with no identity: whatever credential a request carries, the
    /// test sets.
    pub fn anonymous(&self) -> Store {
        Store {
            client: self.client(None),
            auth: None,
            identity: None,
            way: self.way,
            ca_pem: self.tls.as_ref().map(|t| t.ca.pem.clone()),
        }
    }

    fn client(&self, identity: Option<&Identity>) -> reqwest::Client {
        match &self.tls {
            Some(tls) => https(
                &tls.ca.pem,
                identity,
                self.way.transport == Transport::Https2,
            ),
            None => super::client(),
        }
    }
}

/// The subject alternative name of caller `name`'s certificate.
fn san(name: &str) -> String {
    format!("spiffe://franchise/{name}")
}

/// `Basic base64(NAME:KEY)`, a caller's credential header.
pub fn basic(name: &str, key: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{name}:{key}"))
    )
}

/// A store's client: requests carry its key, or go over connections presenting its certificate.
pub struct Store {
    client: reqwest::Client,
    /// The `Authorization` its requests carry (stores identified by key).
    pub auth: Option<String>,
    identity: Option<Arc<Identity>>,
    way: Way,
    ca_pem: Option<String>,
}

impl Store {
    /// A request as this store sends it.
    pub fn request(
        &self,
        method: reqwest::Method,
        url: impl reqwest::IntoUrl,
    ) -> reqwest::RequestBuilder {
        let builder = self.client.request(method, url);
        match &self.auth {
            Some(auth) => builder.header("authorization", auth),
            None => builder,
        }
    }

    pub fn get(&self, url: impl reqwest::IntoUrl) -> reqwest::RequestBuilder {
        self.request(reqwest::Method::GET, url)
    }

    pub fn post(&self, url: impl reqwest::IntoUrl) -> reqwest::RequestBuilder {
        self.request(reqwest::Method::POST, url)
    }

    /// Sends `method url` with `body` as JSON; checks the answer came in this way's protocol.
    pub async fn send(
        &self,
        method: reqwest::Method,
        url: impl reqwest::IntoUrl,
        body: Option<&serde_json::Value>,
    ) -> reqwest::Response {
        let mut req = self.request(method, url);
        if let Some(b) = body {
            req = req.json(b);
        }
        let response = req.send().await.unwrap();
        assert_eq!(response.version(), self.way.version());
        response
    }

    /// Sends one request exactly as written, on a new connection to `addr`: over HTTP/1.1 the
    /// request line carries `target` verbatim; over HTTP/2 `target` is the `:path`, or, when it
    /// is absolute (`scheme://authority/path`), gives `:scheme`, `:authority` and `:path`. The
    /// store's credential is added, a Content-Length for a body, and over HTTP/1.1
    /// `Connection: close` and (unless `headers` has one) `Host: gw`. `None` when no answer
    /// came: HTTP/2 refused the stream, or the connection closed without one.
    pub async fn exchange(
        &self,
        addr: SocketAddr,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Option<RawResponse> {
        let mut headers: Vec<(&str, &str)> = headers.to_vec();
        if let Some(auth) = &self.auth {
            headers.push(("authorization", auth));
        }
        match self.way.transport {
            Transport::Https2 => self.exchange_h2(addr, method, target, &headers, body).await,
            _ => {
                let mut request = format!("{method} {target} HTTP/1.1\r\n");
                if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
                    request += "Host: gw\r\n";
                }
                for (name, value) in headers {
                    request += &format!("{name}: {value}\r\n");
                }
                if !body.is_empty() {
                    request += &format!("Content-Length: {}\r\n", body.len());
                }
                request += "Connection: close\r\n\r\n";
                let mut request = request.into_bytes();
                request.extend_from_slice(body);
                let received = self.http1_bytes(addr, &request).await;
                parse_responses(&received).into_iter().next()
            }
        }
    }

    /// Writes `request` on a new connection (TLS with ALPN `http/1.1` when the way has TLS) and
    /// reads until the gateway closes it. Reading goes on while writing, so an answer sent
    /// before the whole request was read (a refused body) is not lost to the failed write.
    pub async fn http1_bytes(&self, addr: SocketAddr, request: &[u8]) -> Vec<u8> {
        read_while_writing(self.http1_connection(addr).await, request.to_vec()).await
    }

    /// A new HTTP/1.1 connection to `addr` as this store makes them: plain, or TLS (ALPN
    /// `http/1.1`) presenting its certificate when it has one.
    pub async fn http1_connection(&self, addr: SocketAddr) -> Box<dyn Io> {
        let tcp = TcpStream::connect(addr).await.unwrap();
        match &self.ca_pem {
            None => Box::new(tcp),
            Some(ca) => Box::new(self.tls(ca, &[b"http/1.1"], tcp).await),
        }
    }

    /// A new HTTP/2 connection to `addr` (TLS, ALPN `h2`) with the `h2` client, its connection
    /// task running until aborted.
    pub async fn h2_connection(
        &self,
        addr: SocketAddr,
    ) -> (
        h2::client::SendRequest<Bytes>,
        tokio::task::JoinHandle<Result<(), h2::Error>>,
    ) {
        let ca = self.ca_pem.as_deref().expect("HTTP/2 here is over TLS");
        let stream = self
            .tls(ca, &[b"h2"], TcpStream::connect(addr).await.unwrap())
            .await;
        let (send, conn) = h2::client::handshake(stream).await.unwrap();
        (send, tokio::spawn(conn))
    }

    async fn tls(
        &self,
        ca: &str,
        alpn: &[&[u8]],
        tcp: TcpStream,
    ) -> tokio_rustls::client::TlsStream<TcpStream> {
        let config = tls_client(ca, self.identity.as_deref(), alpn);
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap()
    }

    async fn exchange_h2(
        &self,
        addr: SocketAddr,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Option<RawResponse> {
        let uri = if !target.contains("://") {
            http::Uri::builder()
                .scheme("https")
                .authority("localhost")
                .path_and_query(target)
                .build()
                .map_err(|e| e.to_string())
        } else {
            http::Uri::try_from(target).map_err(|e| e.to_string())
        };
        let mut request = http::Request::builder()
            .method(method)
            .uri(uri.unwrap_or_else(|e| panic!("{target}: {e}")));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let mut data = Vec::new();
        if !body.is_empty() {
            request = request.header("content-length", body.len());
            data.push(Bytes::copy_from_slice(body));
        }
        self.h2_frames(addr, request.body(()).unwrap(), &data, None)
            .await
    }

    /// Sends `request` over a new HTTP/2 connection exactly as given (its headers are not
    /// checked against its body: a Content-Length may lie), its body as one DATA frame per
    /// element of `data`, then `trailers` when given; adds nothing, not even the store's key.
    /// `None` when the stream was refused or reset before an answer.
    pub async fn h2_frames(
        &self,
        addr: SocketAddr,
        request: http::Request<()>,
        data: &[Bytes],
        trailers: Option<http::HeaderMap>,
    ) -> Option<RawResponse> {
        let (send, conn) = self.h2_connection(addr).await;
        let what = format!("{} {}", request.method(), request.uri());
        let ends_at_headers = data.is_empty() && trailers.is_none();
        let answer = tokio::time::timeout(Duration::from_secs(10), async {
            let mut send = send.ready().await.ok()?;
            let (answer, mut out) = send.send_request(request, ends_at_headers).ok()?;
            // The gateway may answer (and end the stream) before it has the whole body, as it
            // does for a body declared too large: sending stops there, the answer is still read.
            let mut sent_all = true;
            for (n, frame) in data.iter().enumerate() {
                let last = n + 1 == data.len() && trailers.is_none();
                if out.send_data(frame.clone(), last).is_err() {
                    sent_all = false;
                    break;
                }
            }
            if let Some(trailers) = trailers.filter(|_| sent_all) {
                let _ = out.send_trailers(trailers);
            }
            let answer = answer.await.ok()?;
            let (parts, mut recv) = answer.into_parts();
            let mut body = Vec::new();
            let mut complete = true;
            while let Some(chunk) = recv.data().await {
                match chunk {
                    Ok(chunk) => {
                        let _ = recv.flow_control().release_capacity(chunk.len());
                        body.extend_from_slice(&chunk);
                    }
                    Err(_) => {
                        complete = false;
                        break;
                    }
                }
            }
            let mut head = format!("HTTP/2 {}", parts.status.as_u16());
            for (name, value) in &parts.headers {
                head += &format!("\r\n{name}: {}", String::from_utf8_lossy(value.as_bytes()));
            }
            Some(RawResponse {
                status: parts.status.as_u16(),
                head: head.to_ascii_lowercase(),
                body,
                complete,
            })
        })
        .await
        .unwrap_or_else(|_| panic!("no answer to {what} within 10 s"));
        conn.abort();
        answer
    }
}

/// A byte stream to the gateway: TCP, or TLS over it.
pub trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}

impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// Writes `request` to `stream` while reading everything that comes back, until the peer closes
/// (or 10 s pass).
async fn read_while_writing<S>(stream: S, request: Vec<u8>) -> Vec<u8>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(&request).await;
        let _ = wr.flush().await;
        // Held, not dropped: the write half must stay open until the answer is read.
        std::future::pending::<()>().await;
    });
    let mut received = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        let mut piece = vec![0u8; 16 << 10];
        loop {
            match rd.read(&mut piece).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&piece[..n]),
            }
        }
    })
    .await;
    writer.abort();
    received
}
