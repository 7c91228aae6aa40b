//! The command line: `serve`, `check-config`, `keygen`, `mock-tango`, `demo` and `healthcheck`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::app::{self, Listeners};
use crate::auth::dpop::{pkcs8_pem, DpopAlg, DpopKey};
use crate::config::{Config, ConfigError};
use crate::mock::{MockClient, MockConfig, MockTango, SEED_ACCOUNT, STORES_CLIENT_ID};
use crate::secret::Secret;

/// Attaches Tango RaaS credentials to plain HTTP requests from local apps.
#[derive(Debug, Parser)]
#[command(name = "tango-auth-proxy", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the proxy.
    Serve {
        /// Config file (else $TANGO_PROXY_CONFIG); TANGO_PROXY_* variables override it.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Validate the configuration and print it with secrets redacted.
    CheckConfig {
        /// Config file (else $TANGO_PROXY_CONFIG); TANGO_PROXY_* variables override it.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Write a new DPoP private key (PKCS#8 PEM, mode 0600) and print its JWK thumbprint.
    Keygen {
        /// Signing algorithm.
        #[arg(long, value_enum, default_value = "ES256")]
        alg: DpopAlg,
        /// Where to write the key; an existing file is never overwritten.
        #[arg(long)]
        out: PathBuf,
    },
    /// Run the built-in mock of Tango's token endpoint and RaaS API (for local development).
    MockTango {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8081")]
        listen: SocketAddr,
        #[command(flatten)]
        credentials: MockCredentials,
    },
    /// Exit 0 when the admin listener answers 200 on /livez (or /readyz with --ready), else 1:
    /// for container HEALTHCHECKs and images without curl.
    Healthcheck {
        /// Admin address; default: `listen.admin` from $TANGO_PROXY_LISTEN__ADMIN or the config
        /// file, else 127.0.0.1:9090. An unspecified address (0.0.0.0) is checked on loopback.
        #[arg(long)]
        admin: Option<SocketAddr>,
        /// Check /readyz (a usable credential for every profile) instead of /livez.
        #[arg(long)]
        ready: bool,
        /// Config file to read `listen.admin` from (else $TANGO_PROXY_CONFIG).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Run the mock and the proxy together on loopback and print example requests.
    Demo {
        /// Proxy listener.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Admin listener.
        #[arg(long, default_value = "127.0.0.1:9090")]
        admin: SocketAddr,
    },
}

/// The credentials the mock accepts (defaults are the demo's).
#[derive(Debug, clap::Args)]
struct MockCredentials {
    /// Platform name accepted with Basic auth.
    #[arg(
        long,
        env = "TANGO_MOCK_PLATFORM_NAME",
        default_value = "demo-platform"
    )]
    platform_name: String,
    /// API key accepted with Basic auth.
    #[arg(
        long,
        env = "TANGO_MOCK_API_KEY",
        default_value = "demo-api-key",
        hide_env_values = true,
        hide_default_value = true
    )]
    api_key: String,
    /// OAuth client id.
    #[arg(long, env = "TANGO_MOCK_CLIENT_ID", default_value = "demo-client")]
    client_id: String,
    /// OAuth client secret.
    #[arg(
        long,
        env = "TANGO_MOCK_CLIENT_SECRET",
        default_value = "demo-client-secret",
        hide_env_values = true,
        hide_default_value = true
    )]
    client_secret: String,
    /// Service-account user name.
    #[arg(long, env = "TANGO_MOCK_USERNAME", default_value = "demo-user")]
    username: String,
    /// Service-account password.
    #[arg(
        long,
        env = "TANGO_MOCK_PASSWORD",
        default_value = "demo-password",
        hide_env_values = true,
        hide_default_value = true
    )]
    password: String,
    /// Multiplies token lifetimes and the rate-limit window (0.01 makes a 24 h token last 14 min).
    #[arg(long, default_value_t = 1.0)]
    time_scale: f64,
    /// Client-credentials tokens per client per 20 h window (0 = unlimited), as Tango documents.
    #[arg(long, default_value_t = 1)]
    client_credentials_limit: u32,
    /// Demand DPoP server nonces (answers use_dpop_nonce until proofs carry the current one).
    #[arg(long)]
    dpop_nonces: bool,
    /// Answer this share of token requests (0 to 1, at random) with 503 temporarily_unavailable.
    #[arg(long, default_value_t = 0.0)]
    token_failure_rate: f64,
    /// Also create a franchise of N stores: OAuth client "franchise" with service accounts
    /// store-1..store-N, each owning customer C-STORE-N and account A-STORE-N with $100,000.00
    /// (USD) that no other store can see. Their secrets are listed in the mock's documentation.
    #[arg(long, default_value_t = 0, value_name = "N")]
    stores: usize,
}

/// The most stores `--stores` creates (each is a service account and an account in memory).
const MAX_STORES: usize = 100_000;

impl MockCredentials {
    fn into_config(self) -> anyhow::Result<MockConfig> {
        if !(self.time_scale > 0.0 && self.time_scale.is_finite()) {
            anyhow::bail!("--time-scale must be a positive number");
        }
        if !(0.0..=1.0).contains(&self.token_failure_rate) {
            anyhow::bail!("--token-failure-rate must be between 0 and 1");
        }
        if self.stores > MAX_STORES {
            anyhow::bail!("--stores must be at most {MAX_STORES}");
        }
        if self.stores > 0 && self.client_id == STORES_CLIENT_ID {
            anyhow::bail!(
                "--client-id {STORES_CLIENT_ID:?} is the client --stores creates; choose another"
            );
        }
        let mut config = MockConfig {
            platform_name: self.platform_name,
            api_key: Secret::new(self.api_key),
            platforms: Vec::new(),
            accounts: Vec::new(),
            clients: vec![MockClient {
                name: "Mock".into(),
                client_id: self.client_id,
                client_secret: Secret::new(self.client_secret),
                service_accounts: vec![(self.username, Secret::new(self.password))],
            }],
            time_scale: self.time_scale,
            client_credentials_limit: (self.client_credentials_limit > 0)
                .then_some(self.client_credentials_limit),
            dpop_nonces: self.dpop_nonces,
            token_failure_rate: self.token_failure_rate,
        };
        if self.stores > 0 {
            config.add_stores(self.stores);
        }
        Ok(config)
    }
}

impl Cli {
    /// Runs the chosen command.
    pub fn run(self) -> anyhow::Result<ExitCode> {
        match self.command {
            Command::Serve { config } => serve(config),
            Command::CheckConfig { config } => Ok(check_config(config)),
            Command::Keygen { alg, out } => keygen(alg, &out),
            Command::MockTango {
                listen,
                credentials,
            } => mock_tango(listen, credentials.into_config()?),
            Command::Demo { listen, admin } => demo(listen, admin),
            Command::Healthcheck {
                admin,
                ready,
                config,
            } => Ok(healthcheck(admin, ready, config)),
        }
    }
}

fn report(err: &ConfigError) {
    eprintln!("tango-auth-proxy: {err}");
}

fn runtime(workers: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if workers > 1 {
            b.worker_threads(workers);
        }
        b
    };
    builder
        .enable_all()
        .build()
        .context("cannot start the runtime")
}

fn serve(path: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    ignore_hangups_until_serving();
    let config = match Config::load(path.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            report(&e);
            return Ok(ExitCode::from(2));
        }
    };
    for w in config.warnings() {
        tracing::warn!("{w}");
    }
    runtime(config.listen.workers)?.block_on(async {
        let listeners = Listeners::bind(&config).await?;
        app::serve(&config, listeners, app::shutdown_signal()).await?;
        Ok(ExitCode::SUCCESS)
    })
}

/// SIGHUP means "reload" to a running proxy. Its default action ends the process, so a
/// SIGHUP sent while the proxy is still starting (reading a large configuration, binding)
/// would kill it: a handler is installed at once. It stays installed for the life of the
/// process (the runtime's signal handling never removes one); hangups before the reloader
/// listens are dropped, and the reloader starts by reading again any file changed since the
/// configuration was read.
fn ignore_hangups_until_serving() {
    #[cfg(unix)]
    if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        rt.block_on(async {
            let _ = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
        });
    }
}

fn keygen(alg: DpopAlg, out: &std::path::Path) -> anyhow::Result<ExitCode> {
    let (key, der) = DpopKey::generate(alg)?;
    let pem = zeroize::Zeroizing::new(pkcs8_pem(&der));
    write_private_file(out, pem.as_bytes())
        .with_context(|| format!("cannot write {}", out.display()))?;
    println!("{}", key.thumbprint());
    eprintln!(
        "wrote a new {} DPoP key to {} (mode 0600); its JWK thumbprint is printed above",
        alg.as_str(),
        out.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Deletes a file when dropped.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Creates `path` with mode 0600 (never replacing an existing file) and writes `bytes`.
fn write_private_file(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

fn check_config(path: Option<PathBuf>) -> ExitCode {
    match Config::load(path.as_deref()) {
        Ok(config) => {
            for w in config.warnings() {
                eprintln!("tango-auth-proxy: warning: {w}");
            }
            println!("# configuration is valid; effective values, secrets redacted:\n");
            print!("{}", config.to_redacted_toml());
            ExitCode::SUCCESS
        }
        Err(e) => {
            report(&e);
            ExitCode::from(1)
        }
    }
}

/// How long the health check waits for the whole answer.
const HEALTHCHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

fn healthcheck(admin: Option<SocketAddr>, ready: bool, config: Option<PathBuf>) -> ExitCode {
    let addr = admin.unwrap_or_else(|| admin_from_config(config));
    let addr = match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::from(([127, 0, 0, 1], addr.port()))
        }
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, addr.port()))
        }
        _ => addr,
    };
    let path = if ready { "/readyz" } else { "/livez" };
    match probe(addr, path) {
        Ok(200) => ExitCode::SUCCESS,
        Ok(status) => {
            eprintln!("tango-auth-proxy healthcheck: http://{addr}{path} answered {status}");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("tango-auth-proxy healthcheck: http://{addr}{path}: {e}");
            ExitCode::from(1)
        }
    }
}

/// `listen.admin` as the proxy itself would see it, read without loading the rest of the
/// configuration (a health check must not need the secrets).
fn admin_from_config(path: Option<PathBuf>) -> SocketAddr {
    let default = SocketAddr::from(([127, 0, 0, 1], 9090));
    if let Some(addr) = std::env::var("TANGO_PROXY_LISTEN__ADMIN")
        .ok()
        .and_then(|v| v.trim().parse().ok())
    {
        return addr;
    }
    let path = path.or_else(|| std::env::var_os("TANGO_PROXY_CONFIG").map(PathBuf::from));
    // The same checks as `serve`: a FIFO or device given as the config never blocks the probe.
    path.and_then(|p| crate::config::read_config_file(&p).ok())
        .and_then(|text| text.parse::<toml::Table>().ok())
        .and_then(|t| t.get("listen")?.get("admin")?.as_str()?.trim().parse().ok())
        .unwrap_or(default)
}

/// One HTTP/1.1 GET; the status code.
fn probe(addr: SocketAddr, path: &str) -> std::io::Result<u16> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&addr, HEALTHCHECK_TIMEOUT)?;
    stream.set_read_timeout(Some(HEALTHCHECK_TIMEOUT))?;
    stream.set_write_timeout(Some(HEALTHCHECK_TIMEOUT))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut head = [0u8; 64];
    let mut read = 0;
    while read < 12 {
        match stream.read(&mut head[read..])? {
            0 => break,
            n => read += n,
        }
    }
    std::str::from_utf8(&head[..read])
        .ok()
        .and_then(|h| h.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other("not an HTTP answer"))
}

fn mock_tango(listen: SocketAddr, config: MockConfig) -> anyhow::Result<ExitCode> {
    let stores = config
        .clients
        .iter()
        .find(|c| c.client_id == STORES_CLIENT_ID)
        .map_or(0, |c| c.service_accounts.len());
    let mock = MockTango::new(config);
    runtime(0)?.block_on(async {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        tracing::info!(addr = %listener.local_addr()?, "mock Tango listening");
        if stores > 0 {
            tracing::info!(
                client_id = STORES_CLIENT_ID,
                "mock Tango: {stores} stores, service accounts store-1..store-{stores} owning accounts A-STORE-1..A-STORE-{stores}"
            );
        }
        mock.serve(listener, app::shutdown_signal()).await?;
        Ok(ExitCode::SUCCESS)
    })
}

fn demo(listen: SocketAddr, admin: SocketAddr) -> anyhow::Result<ExitCode> {
    runtime(0)?.block_on(async {
        let mock_config = MockConfig {
            dpop_nonces: true,
            ..MockConfig::default()
        };
        let client = mock_config
            .clients
            .first()
            .cloned()
            .context("the demo mock has no client")?;
        let (username, password) = client
            .service_accounts
            .first()
            .cloned()
            .context("the demo mock has no service account")?;
        let mock = MockTango::new(mock_config);
        let mock_addr = mock
            .spawn(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .context("cannot start the mock")?;
        // A DPoP key made for this run; removed again at exit.
        let key_path =
            std::env::temp_dir().join(format!("tango-auth-proxy-demo-{}.pem", std::process::id()));
        let _ = std::fs::remove_file(&key_path);
        let (key, der) = DpopKey::generate(DpopAlg::Es256)?;
        write_private_file(&key_path, pkcs8_pem(&der).as_bytes())
            .with_context(|| format!("cannot write {}", key_path.display()))?;
        let _cleanup = RemoveOnDrop(key_path.clone());
        let toml = format!(
            r#"
[listen]
proxy = "{listen}"
admin = "{admin}"
[upstream]
url = "http://{mock_addr}"
allow_http = true
[profiles.default]
auth = "service_account"
token_url = "http://{mock_addr}/oauth/token"
client_id = "{client_id}"
client_secret = "{client_secret}"
username = "{username}"
password = "{password}"
dpop_key_file = "{key_file}"
"#,
            key_file = key_path.display(),
            client_id = client.client_id,
            client_secret = client.client_secret.expose(),
            password = password.expose(),
        );
        let config = Config::from_toml(&toml).map_err(|e| anyhow::anyhow!("{e}"))?;
        let listeners = Listeners::bind(&config).await.with_context(|| {
            "is another proxy running? choose other ports with --listen and --admin".to_string()
        })?;
        let running = app::start(&config, listeners)?;
        let p = running.proxy_addr;
        let a = running.admin_addr;
        println!(
            r#"
tango-auth-proxy demo: a mock Tango on http://{mock_addr}, the proxy on http://{p}.
The proxy signs in to the mock as service account "{username}" (OAuth 2.0, grant_type=password)
with a DPoP-bound token (server nonces on), keeps the token fresh, and adds it with a freshly
signed DPoP proof to your requests, which carry no credentials.
DPoP key thumbprint for this run: {jkt}
Try, from another terminal:

  curl -s http://{p}/raas/v2/catalogs
  curl -s http://{p}/raas/v2/accounts/{SEED_ACCOUNT}
  curl -s -X POST http://{p}/raas/v2/orders -H 'content-type: application/json' \
       -d '{{"accountIdentifier":"{SEED_ACCOUNT}","customerIdentifier":"demo-customer","amount":10,"utid":"U561593","externalRefID":"demo1"}}'
  curl -s http://{p}/raas/v2/catalogs -H 'authorization: Basic bm90OnVzZWQ='   # replaced by the proxy
  curl -s http://{a}/status
  curl -s http://{a}/metrics
  curl -s http://{mock_addr}/mock/stats           # what the mock saw

Press Ctrl-C to stop.
"#,
            jkt = key.thumbprint(),
        );
        app::shutdown_signal().await;
        running.stop();
        running.wait().await;
        Ok(ExitCode::SUCCESS)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mock_config(args: &[&str]) -> anyhow::Result<MockConfig> {
        let cli = Cli::try_parse_from(["tango-auth-proxy", "mock-tango"].iter().chain(args))?;
        match cli.command {
            Command::MockTango { credentials, .. } => credentials.into_config(),
            other => anyhow::bail!("parsed as {other:?}"),
        }
    }

    #[test]
    fn mock_tango_stores_adds_the_franchise_to_the_command_line_credentials() {
        assert!(mock_config(&[]).unwrap().accounts.is_empty());
        let c = mock_config(&["--stores", "4", "--client-id", "pos-client"]).unwrap();
        let ids: Vec<_> = c.clients.iter().map(|c| c.client_id.as_str()).collect();
        assert_eq!(ids, ["pos-client", STORES_CLIENT_ID]);
        let expected = MockConfig::with_stores(4);
        assert_eq!(c.accounts, expected.accounts);
        assert_eq!(c.clients[1].service_accounts.len(), 4);
        assert_eq!(c.clients[1].service_accounts[3].0, "store-4");

        let err = mock_config(&["--stores", "100001"]).unwrap_err();
        assert!(
            err.to_string().contains("--stores must be at most 100000"),
            "{err}"
        );
        let err = mock_config(&["--stores", "1", "--client-id", "franchise"]).unwrap_err();
        assert!(
            err.to_string().contains("is the client --stores creates"),
            "{err}"
        );
        assert!(mock_config(&["--stores", "-1"]).is_err());
    }

    #[test]
    fn mock_tango_help_says_what_stores_creates_without_its_secrets() {
        use clap::CommandFactory;
        let mut cli = Cli::command();
        let help = cli
            .find_subcommand_mut("mock-tango")
            .unwrap()
            .render_long_help()
            .to_string();
        assert!(help.contains("--stores <N>"), "{help}");
        assert!(help.contains("store-1..store-N"), "{help}");
        assert!(help.contains("A-STORE-N"), "{help}");
        for secret in [
            "franchise-secret",
            "store-N-password",
            "demo-password",
            "demo-api-key",
        ] {
            assert!(!help.contains(secret), "{secret}: {help}");
        }
    }

    #[test]
    fn mock_tango_takes_a_token_failure_rate_between_zero_and_one() {
        assert_eq!(mock_config(&[]).unwrap().token_failure_rate, 0.0);
        let c = mock_config(&["--token-failure-rate", "0.2"]).unwrap();
        assert_eq!(c.token_failure_rate, 0.2);
        for bad in ["1.5", "-0.1", "NaN"] {
            let err = mock_config(&[&format!("--token-failure-rate={bad}")]).unwrap_err();
            assert!(
                err.to_string()
                    .contains("--token-failure-rate must be between 0 and 1"),
                "{bad}: {err}"
            );
        }
    }
}
