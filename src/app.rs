//! Wiring: binds the listeners, builds the profile, the proxy and the admin router, runs them
//! together and stops them together.
//!
//! Listeners are bound before anything is served (and may be handed in already bound, as tests do
//! with port 0), so a port clash is reported at start with the address in the message.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use hyper::service::service_fn;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin::{self, AdminState};
use crate::auth::{AuthBuildError, Profile, ProfileSet};
use crate::config::CacheBackend;
use crate::config::Config;
use crate::gateway::spend::{MemoryLedger, RedisLedger, SpendLedger};
use crate::gateway::Gateway;
use crate::listener;
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::tls::{ClientCert, TlsError};
use crate::token::store::{FileStore, MemoryStore, TokenStore};
use crate::token::RedisStore;

/// Starting the proxy failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AppError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Which listener.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// The TLS client could not be built.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// A profile could not be built.
    #[error(transparent)]
    Auth(#[from] AuthBuildError),
    /// The configuration has no profile.
    #[error("no profile configured")]
    NoProfile,
    /// The token store could not be opened.
    #[error("token cache: {0}")]
    Store(String),
    /// The gateway's callers could not be set up.
    #[error("{0}")]
    Gateway(String),
}

/// The two listeners, already bound.
#[derive(Debug)]
pub struct Listeners {
    /// Where apps connect.
    pub proxy: TcpListener,
    /// Where the admin endpoints are served.
    pub admin: TcpListener,
}

impl Listeners {
    /// Binds `listen.proxy` and `listen.admin`.
    pub async fn bind(config: &Config) -> Result<Self, AppError> {
        let bind = |addr: SocketAddr, what: &'static str| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| AppError::Bind { addr, what, source })
        };
        Ok(Self {
            proxy: bind(config.listen.proxy, "listen.proxy").await?,
            admin: bind(config.listen.admin, "listen.admin").await?,
        })
    }
}

/// A running proxy: its addresses and a way to stop it.
#[derive(Debug)]
pub struct Running {
    /// The proxy listener's address.
    pub proxy_addr: SocketAddr,
    /// The admin listener's address.
    pub admin_addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Running {
    /// Begins a graceful shutdown.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }

    /// Waits until both listeners have finished (after [`Running::stop`]).
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

/// Starts the proxy and admin listeners on the current runtime.
pub fn start(config: &Config, listeners: Listeners) -> Result<Running, AppError> {
    let proxy_addr = local_addr(&listeners.proxy, config.listen.proxy, "listen.proxy")?;
    let admin_addr = local_addr(&listeners.admin, config.listen.admin, "listen.admin")?;
    let profile_config = config.default_profile().ok_or(AppError::NoProfile)?;
    let metrics = Arc::new(Metrics::new());
    let mut redis = None;
    let store: Arc<dyn TokenStore> = match (&config.cache.backend, &config.cache.path) {
        (CacheBackend::File, Some(dir)) => Arc::new(
            FileStore::new(
                dir,
                &config.cache.key_prefix,
                config.cache.sealer.clone(),
                metrics.clone(),
            )
            .map_err(|e| AppError::Store(e.to_string()))?,
        ),
        (CacheBackend::Redis, _) => {
            let store = Arc::new(
                RedisStore::new(
                    &config.cache.redis,
                    &config.cache.key_prefix,
                    config.cache.sealer.clone(),
                    metrics.clone(),
                )
                .map_err(|e| AppError::Store(e.to_string()))?,
            );
            redis = Some(store.clone());
            store
        }
        _ => Arc::new(MemoryStore::default()),
    };
    // A gateway's profiles start idle and get their first token when a store first calls
    // (see `Tuning::lazy`); a sidecar's one profile gets it at once.
    let tuning = crate::token::Tuning {
        store_check: config.cache.check_interval,
        lazy: config.is_gateway(),
        ..crate::token::Tuning::default()
    };
    let profiles = config
        .profiles
        .values()
        .map(|p| {
            Profile::from_config(
                p,
                &config.upstream,
                store.clone(),
                metrics.clone(),
                tuning.clone(),
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    let profiles = Arc::new(ProfileSet::new(profiles));
    let ledger: Arc<dyn SpendLedger> = match redis {
        Some(store) => Arc::new(RedisLedger::new(store)),
        None => Arc::new(MemoryLedger::default()),
    };
    let gateway = Gateway::new(config, ledger.clone(), &metrics, &|name| {
        profiles.index(name)
    })
    .map_err(AppError::Gateway)?
    .map(Arc::new);
    let (gateway_tx, gateway_rx) = watch::channel(gateway);
    let reloads = Arc::new(std::sync::Mutex::new(crate::reload::ReloadStatus::default()));
    let proxy = Proxy::new(
        config,
        profiles.clone(),
        gateway_rx.clone(),
        metrics.clone(),
        proxy_addr,
    )?;
    // The proxy listener's TLS files are watched while it runs: new handshakes take what they
    // hold now (see `tls_reload`).
    let (tls_reloader, tls_cell, tls_status) = match &config.listen.tls {
        Some(tls) => {
            let (reloader, cell, status) =
                crate::tls_reload::TlsReloader::new(tls, metrics.clone());
            (Some(reloader), Some(cell), Some(status))
        }
        None => (None, None, None),
    };
    let admin_state = AdminState::new(
        config,
        profiles.clone(),
        gateway_rx,
        reloads.clone(),
        metrics.clone(),
    )
    .with_tls(tls_status);

    let (stop, stopped) = watch::channel(false);
    let listen = &config.listen;
    warn_if_descriptors_short(listen.max_connections + listen.admin_max_connections);
    let proxy_settings = listener::Settings::new(
        "proxy",
        (listen.max_connections, "listen.max_connections"),
        // Above `listen.max_header_size`, so an oversized header section reaches the proxy's own
        // check and gets the JSON 431; only one beyond twice the limit gets hyper's bare 431.
        usize::try_from(listen.max_header_size)
            .unwrap_or(usize::MAX)
            .saturating_mul(2)
            .saturating_add(16 << 10),
        listen,
        &metrics,
    );
    let proxy_settings = listener::Settings {
        tls: tls_cell,
        ..proxy_settings
    };
    let proxy_task = tokio::spawn(listener::serve(
        listeners.proxy,
        proxy_settings,
        move |remote, cert: Option<ClientCert>| {
            let proxy = proxy.clone();
            service_fn(move |mut req| {
                let proxy = proxy.clone();
                // The gateway identifies a caller by it (see `Gateway::authenticate`).
                if let Some(cert) = &cert {
                    req.extensions_mut().insert(cert.clone());
                }
                async move { Ok::<_, Infallible>(proxy.handle(req, remote).await) }
            })
        },
        wait_for(stopped.clone()),
    ));
    let admin_settings = listener::Settings::new(
        "admin",
        (listen.admin_max_connections, "listen.admin_max_connections"),
        16 << 10,
        listen,
        &metrics,
    );
    let router = admin::router(admin_state);
    let admin_task = tokio::spawn(listener::serve(
        listeners.admin,
        admin_settings,
        move |_, _| TowerToHyperService::new(router.clone()),
        wait_for(stopped.clone()),
    ));
    let tls_task = tls_reloader.map(|r| tokio::spawn(r.run(wait_for(stopped.clone()))));
    // Reloads on SIGHUP and when the config file or a file it names changes: callers, and
    // profiles' credentials (see `reload`).
    let reloader = crate::reload::Reloader::new(
        config.source.clone(),
        config.clone(),
        crate::reload::Targets {
            gateway: gateway_tx,
            ledger,
            profiles: profiles.clone(),
            builder: crate::reload::Builder {
                upstream: config.upstream.clone(),
                store,
                metrics: metrics.clone(),
                tuning,
            },
            status: reloads,
        },
    );
    let reload_task = Some(tokio::spawn(reloader.run(wait_for(stopped))));
    let task = tokio::spawn(async move {
        let _ = proxy_task.await;
        let _ = admin_task.await;
        if let Some(t) = reload_task {
            let _ = t.await;
        }
        if let Some(t) = tls_task {
            let _ = t.await;
        }
    });
    tracing::info!(
        proxy = %proxy_addr,
        admin = %admin_addr,
        upstream = %config.upstream.url,
        profile = %profile_config.name,
        auth = profile_config.auth.method().as_str(),
        profiles = config.profiles.len(),
        callers = config.callers.len(),
        mode = if config.is_gateway() { "gateway" } else { "sidecar" },
        "tango-auth-proxy listening"
    );
    Ok(Running {
        proxy_addr,
        admin_addr,
        stop,
        task,
    })
}

/// Runs until `shutdown` resolves, then drains and returns.
pub async fn serve(
    config: &Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AppError> {
    let running = start(config, listeners)?;
    shutdown.await;
    tracing::info!("shutting down");
    running.stop();
    running.wait().await;
    tracing::info!("stopped");
    Ok(())
}

fn local_addr(
    listener: &TcpListener,
    addr: SocketAddr,
    what: &'static str,
) -> Result<SocketAddr, AppError> {
    listener
        .local_addr()
        .map_err(|source| AppError::Bind { addr, what, source })
}

/// Warns when the open-file limit cannot hold both listeners' connection caps plus the
/// descriptors the proxy needs besides (upstream and Redis connections, files): the caps would
/// then never be reached, and accepts would fail with "Too many open files" instead.
fn warn_if_descriptors_short(connections: usize) {
    const RESERVE: usize = 128;
    let Ok(limits) = std::fs::read_to_string("/proc/self/limits") else {
        return;
    };
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|n| n.parse::<usize>().ok());
    if let Some(soft) = soft {
        if connections.saturating_add(RESERVE) > soft {
            tracing::warn!(
                open_files_limit = soft,
                "listen.max_connections + listen.admin_max_connections ({connections}) plus {RESERVE} \
                 for upstream and cache connections exceed the open-file limit; raise it \
                 (ulimit -n) or lower the caps"
            );
        }
    }
}

async fn wait_for(mut stopped: watch::Receiver<bool>) {
    // An error means the sender is gone, which also means stop.
    let _ = stopped.wait_for(|s| *s).await;
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT received"),
        () = term => tracing::info!("SIGTERM received"),
    }
}
