//! Fakes and helpers shared by the integration tests: a recording upstream (plain or TLS), an
//! in-process proxy on port 0, the real binary as a child process, and raw-socket requests.

#![allow(dead_code)]

pub mod h2_upstream;
pub mod logs;
pub mod raw;
pub mod redis_server;
pub mod transport;
pub mod upstream;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tango_auth_proxy::app::{self, Listeners, Running};
use tango_auth_proxy::config::Config;
use tango_auth_proxy::mock::{MockClient, MockConfig, MockTango};
use tango_auth_proxy::secret::Secret;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub use redis_server::{RedisCluster, RedisSentinel, RedisServer};
pub use upstream::FakeUpstream;

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

pub const PLATFORM: &str = "test-platform";
pub const API_KEY: &str = "k3y-Th4t-Must-N0t-L3ak";

/// The Basic header the proxy must send for PLATFORM:API_KEY.
pub fn expected_basic() -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{PLATFORM}:{API_KEY}"))
    )
}

/// A proxy config for `upstream_url` with a Basic profile; `extra` is appended TOML.
pub fn config_toml(upstream_url: &str, extra_listen: &str, extra_upstream: &str) -> String {
    format!(
        r#"
[listen]
proxy = "127.0.0.1:0"
admin = "127.0.0.1:0"
{extra_listen}
[upstream]
url = "{upstream_url}"
allow_http = true
{extra_upstream}
[profiles.default]
auth = "basic"
platform_name = "{PLATFORM}"
api_key = "{API_KEY}"
"#
    )
}

pub const CLIENT_ID: &str = "test-client";
pub const CLIENT_SECRET: &str = "cl13nt-S3cret-Must-N0t-L3ak";
pub const USERNAME: &str = "svc-store-17";
pub const PASSWORD: &str = "pa55w0rd-Must-N0t-L3ak";
pub const FIVE_MINUTE_AUDIENCE: &str = "https://api.bhn.com/fiveminute";

/// A mock Tango that knows the test client and service account.
pub fn mock_config(time_scale: f64) -> MockConfig {
    MockConfig {
        platform_name: PLATFORM.into(),
        api_key: Secret::new(API_KEY),
        platforms: Vec::new(),
        accounts: Vec::new(),
        clients: vec![MockClient {
            name: "Test".into(),
            client_id: CLIENT_ID.into(),
            client_secret: Secret::new(CLIENT_SECRET),
            service_accounts: vec![(USERNAME.into(), Secret::new(PASSWORD))],
        }],
        time_scale,
        client_credentials_limit: Some(1),
        dpop_nonces: false,
        token_failure_rate: 0.0,
    }
}

/// Starts a mock on a free port; returns it and its base URL.
pub async fn start_mock(config: MockConfig) -> (MockTango, String) {
    let mock = MockTango::new(config);
    logs::watch_mock(&mock);
    let addr = mock
        .clone()
        .spawn("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    (mock, format!("http://{addr}"))
}

/// A proxy config for an OAuth profile (`auth`) against the mock at `mock_url`.
pub fn oauth_toml(mock_url: &str, auth: &str, extra_profile: &str) -> String {
    let account = if auth == "service_account" {
        format!("username = \"{USERNAME}\"\npassword = \"{PASSWORD}\"\n")
    } else {
        String::new()
    };
    format!(
        r#"
[listen]
proxy = "127.0.0.1:0"
admin = "127.0.0.1:0"
[upstream]
url = "{mock_url}"
allow_http = true
[profiles.default]
auth = "{auth}"
token_url = "{mock_url}/oauth/token"
client_id = "{CLIENT_ID}"
client_secret = "{CLIENT_SECRET}"
{account}{extra_profile}
"#
    )
}

/// [`oauth_toml`] with tokens from the mock at `mock_url` and API requests to `upstream_url`
/// (a recording fake, or one answering with garbage).
pub fn oauth_toml_via(
    mock_url: &str,
    upstream_url: &str,
    auth: &str,
    extra_profile: &str,
) -> String {
    let toml = oauth_toml(mock_url, auth, extra_profile).replace(
        &format!("url = \"{mock_url}\"\nallow_http"),
        &format!("url = \"{upstream_url}\"\nallow_http"),
    );
    assert!(toml.contains(upstream_url), "{toml}");
    toml
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            logs::assert_no_secret_captured();
        }
    }
}

/// A proxy running inside the test process.
pub struct TestProxy {
    running: Option<Running>,
    proxy_addr: SocketAddr,
    pub url: String,
    pub admin_url: String,
}

impl TestProxy {
    pub async fn start(toml: &str) -> TestProxy {
        logs::capture();
        let config = Config::from_toml(toml).unwrap_or_else(|e| panic!("{e}"));
        Self::start_config(&config).await
    }

    /// A proxy loaded from the config file at `path`, as `serve --config` loads it: it reloads
    /// when the file, or a file it names, changes.
    pub async fn start_file(path: &Path) -> TestProxy {
        logs::capture();
        let config = Config::load(Some(path)).unwrap_or_else(|e| panic!("{e}"));
        Self::start_config(&config).await
    }

    async fn start_config(config: &Config) -> TestProxy {
        let listeners = Listeners {
            proxy: TcpListener::bind("127.0.0.1:0").await.unwrap(),
            admin: TcpListener::bind("127.0.0.1:0").await.unwrap(),
        };
        let running = app::start(config, listeners).unwrap();
        let url = format!("http://{}", running.proxy_addr);
        let admin_url = format!("http://{}", running.admin_addr);
        TestProxy {
            proxy_addr: running.proxy_addr,
            running: Some(running),
            url,
            admin_url,
        }
    }

    /// A proxy in front of `upstream` with default settings.
    pub async fn basic(upstream: &FakeUpstream) -> TestProxy {
        Self::start(&config_toml(&upstream.url(), "", "")).await
    }

    pub fn addr(&self) -> SocketAddr {
        self.proxy_addr
    }

    /// Begins a graceful shutdown.
    pub fn stop(&self) {
        if let Some(r) = &self.running {
            r.stop();
        }
    }

    /// Waits for the shutdown to finish.
    pub async fn wait(mut self) {
        if let Some(r) = self.running.take() {
            r.wait().await;
        }
    }

    /// The admin `/status` JSON.
    pub async fn status(&self) -> serde_json::Value {
        get_json(&format!("{}/status", self.admin_url)).await
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let r = client()
                .get(format!("{}/readyz", self.admin_url))
                .send()
                .await
                .unwrap();
            if r.status() == 200 {
                return;
            }
            assert!(Instant::now() < deadline, "the proxy never became ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// GET `path` (with query) through the proxy.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        client()
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .unwrap()
    }
}

pub fn client() -> reqwest::Client {
    // reqwest shares the proxy's rustls build, which has ring but no process-wide default.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// Sends every GET at once; returns the statuses in order.
pub async fn concurrent_gets(urls: Vec<String>) -> Vec<u16> {
    let c = client();
    let requests: Vec<_> = urls
        .into_iter()
        .map(|url| {
            let c = c.clone();
            tokio::spawn(async move { c.get(url).send().await.map(|r| r.status().as_u16()) })
        })
        .collect();
    let mut statuses = Vec::new();
    for r in requests {
        statuses.push(r.await.unwrap().unwrap());
    }
    statuses
}

/// GET `url` and parse its JSON body.
/// A $5 order for the mock's seed account through `base` (a proxy's URL).
pub async fn post_order(base: &str, external_ref_id: &str) -> reqwest::Response {
    let order = serde_json::json!({
        "accountIdentifier": tango_auth_proxy::mock::SEED_ACCOUNT,
        "customerIdentifier": tango_auth_proxy::mock::SEED_CUSTOMER,
        "amount": 5,
        "utid": "U561593",
        "externalRefID": external_ref_id
    });
    client()
        .post(format!("{base}/raas/v2/orders"))
        .json(&order)
        .send()
        .await
        .unwrap()
}

pub async fn get_json(url: &str) -> serde_json::Value {
    client()
        .get(url)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// The value of one metric on an admin listener at `admin_url`: `series` is a name with its
/// labels as exposed (`tango_proxy_proxy_errors_total{cause="bad_request"}`), or a bare name for
/// the sum of all its series; 0 when it has none yet.
pub async fn metric(admin_url: &str, series: &str) -> f64 {
    let text = get_text(&format!("{admin_url}/metrics")).await;
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(name, _)| {
            *name == series || (!series.contains('{') && name.starts_with(&format!("{series}{{")))
        })
        .map(|(_, value)| value.parse::<f64>().unwrap())
        .sum()
}

/// GET `url` and return its body.
pub async fn get_text(url: &str) -> String {
    client()
        .get(url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Sends raw bytes and returns the whole response as text (the proxy closes or we time out).
pub async fn raw_request(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut buf)).await;
    String::from_utf8_lossy(&buf).into_owned()
}

/// Status code of a raw HTTP/1.1 response.
pub fn raw_status(response: &str) -> u16 {
    response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// The JSON body of a raw response.
pub fn raw_json(response: &str) -> serde_json::Value {
    let body = response.split("\r\n\r\n").nth(1).unwrap_or_default();
    serde_json::from_str(body).unwrap_or(serde_json::Value::Null)
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, data).as_ref())
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The deterministic payload the fake upstream streams for `/download?bytes=N`.
pub fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(upstream::pattern_byte).collect()
}

/// Asserts a proxy-made error: status, cause header, Tango JSON shape.
pub async fn assert_proxy_error(
    resp: reqwest::Response,
    status: u16,
    cause: &str,
) -> serde_json::Value {
    assert_eq!(resp.status().as_u16(), status, "status");
    assert_eq!(
        resp.headers()["x-tango-proxy-error"].to_str().unwrap(),
        cause
    );
    assert!(resp.headers().contains_key("x-request-id"));
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "application/json"
    );
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_json_error_shape(&body, status, cause);
    body
}

/// Asserts a proxy-made error read from a raw socket: status, cause header, Tango JSON shape;
/// returns the body.
pub fn assert_raw_proxy_error(response: &str, status: u16, cause: &str) -> serde_json::Value {
    assert_eq!(raw_status(response), status, "{response}");
    assert!(
        response
            .to_ascii_lowercase()
            .contains(&format!("x-tango-proxy-error: {cause}")),
        "{response}"
    );
    let body = raw_json(response);
    assert_json_error_shape(&body, status, cause);
    body
}

pub fn assert_json_error_shape(body: &serde_json::Value, status: u16, cause: &str) {
    assert_eq!(body["httpCode"], status, "{body}");
    assert_eq!(body["i18nKey"], format!("proxy.{cause}"), "{body}");
    for field in ["timestamp", "requestId", "path", "httpPhrase", "message"] {
        assert!(body[field].is_string(), "missing {field}: {body}");
    }
}

/// A private CA and a rustls server config for 127.0.0.1 signed by it; returns (CA PEM, config).
pub fn private_ca_server() -> (String, rustls::ServerConfig) {
    use rustls::pki_types::pem::PemObject;
    let (ca_pem, cert_pem, key_pem) = private_ca_cert_and_key();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap()],
            PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap(),
        )
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    (ca_pem, config)
}

/// A private CA and a server certificate for 127.0.0.1 signed by it, as PEM:
/// (CA certificate, server certificate, server private key).
pub fn private_ca_cert_and_key() -> (String, String, String) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &ca, &ca_key)
        .unwrap();
    (ca.pem(), leaf.pem(), leaf_key.serialize_pem())
}

// ------------------------------------------------------------------------------------------
// The real binary

pub const BIN: &str = env!("CARGO_BIN_EXE_tango-auth-proxy");

/// Runs the binary to completion; returns (exit code, stdout, stderr).
pub fn run_bin(args: &[&str], envs: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .env_clear()
        .envs(envs.iter().copied())
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `tango-auth-proxy serve` as a child process, its stderr collected.
pub struct ProxyProcess {
    pub child: Child,
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub logs: Arc<Mutex<String>>,
    /// The directory of a config written by [`ProxyProcess::start_toml`], removed on drop.
    config_dir: Option<tempfile::TempDir>,
}

impl ProxyProcess {
    /// Writes `toml` to a config file of its own and starts `serve` with it.
    pub fn start_toml(toml: &str, envs: &[(&str, &str)]) -> ProxyProcess {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("proxy.toml");
        std::fs::write(&cfg, toml).unwrap();
        let mut proc = Self::start(&cfg, envs);
        proc.config_dir = Some(dir);
        proc
    }

    /// The admin listener's base URL.
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin_addr)
    }

    /// Starts `serve --config path` with JSON logs and waits for its listening line.
    pub fn start(config: &Path, envs: &[(&str, &str)]) -> ProxyProcess {
        let mut child = Command::new(BIN)
            .arg("serve")
            .arg("--config")
            .arg(config)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("TANGO_PROXY_LOG_FORMAT", "json")
            .envs(envs.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let logs = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    if v["message"] == "tango-auth-proxy listening" {
                        let _ = tx.send((
                            v["proxy"].as_str().unwrap_or_default().to_string(),
                            v["admin"].as_str().unwrap_or_default().to_string(),
                        ));
                    }
                }
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let Ok((proxy, admin)) = rx.recv_timeout(Duration::from_secs(30)) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("proxy did not start: {}", logs.lock().unwrap());
        };
        ProxyProcess {
            child,
            proxy_addr: proxy.parse().unwrap(),
            admin_addr: admin.parse().unwrap(),
            logs,
            config_dir: None,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.proxy_addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A field of /proc/PID/status in KiB (VmRSS, VmHWM).
    pub fn proc_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|n| n.parse().ok())
            .unwrap()
    }

    /// Sends SIGHUP (a reload).
    pub fn hangup(&self) {
        let ok = Command::new("kill")
            .args(["-HUP", &self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }

    /// Sends SIGTERM and waits for the exit code.
    pub fn terminate(mut self) -> (i32, String) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        let code = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status.code().unwrap_or(-1);
            }
            assert!(
                Instant::now() < deadline,
                "proxy did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        // Give the log reader a moment to drain the pipe after exit.
        std::thread::sleep(Duration::from_millis(50));
        let logs = self.logs.lock().unwrap().clone();
        logs::assert_no_secret_in(&logs);
        (code, logs)
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Replaces a file the way Kubernetes updates a mounted Secret: a new file, then a rename.
pub fn replace_by_rename(path: &Path, contents: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// `[profiles.store-i]` for every store: a service account of the mock's `franchise` client
/// (`MockConfig::with_stores`).
pub fn store_profiles(mock_url: &str, stores: usize) -> String {
    (1..=stores)
        .map(|i| {
            format!(
                r#"
[profiles.store-{i}]
auth = "service_account"
token_url = "{mock_url}/oauth/token"
client_id = "franchise"
client_secret = "franchise-secret"
username = "store-{i}"
password = "store-{i}-password"
"#
            )
        })
        .collect()
}
