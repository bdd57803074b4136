//! Assembles a running balancer from a [`Config`]: the farm's registry (pools, routes,
//! backends), the [`Upstream`](crate::upstream::Upstream) connections, the listeners, the
//! admin listener, and the tasks beside the request path: housekeeping (pin expiry, drains,
//! history), the health prober, certificate checks, and the reload on SIGHUP.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::{TcpListener, TcpSocket};
use tokio::task::JoinSet;

use crate::admin;
use crate::config::{AdminListen, Config, TlsConfig};
use crate::core::pool::Pool;
use crate::core::registry::Registry;
use crate::farm::{self, Farm, ReloadError};
use crate::listener;
use crate::listener::TlsFront;
use crate::notify::Notifier;
use crate::proxy::Proxy;
use crate::shutdown::{self, Signal, Trigger};
use crate::store::shared::SharedPins;
use crate::store::state_file::StateFile;
use crate::tls::{self, CertError, CertResolver, CertStore};
use crate::upgrade::{self, Handoff, Inherited, Kind, UpgradeError};
use crate::upstream;
use http::HeaderValue;
use std::ffi::OsString;
use std::os::fd::AsFd;
use tokio_rustls::TlsAcceptor;

/// A balancer that is serving.
pub struct Running {
    addrs: Vec<SocketAddr>,
    admin_addr: Option<SocketAddr>,
    tls_addrs: Vec<SocketAddr>,
    redirect_addrs: Vec<SocketAddr>,
    certificates: Option<Arc<CertResolver>>,
    farm: Arc<Farm>,
    proxy: Arc<Proxy>,
    handoff: Option<Arc<Handoff>>,
    notifier: Option<Arc<Notifier>>,
    shutdown: Trigger,
    tasks: JoinSet<()>,
    /// The tidegate this one took over from, while it finishes its requests.
    predecessor: Option<upgrade::Predecessor>,
    /// How long a stop lets requests in flight finish.
    shutdown_timeout: std::time::Duration,
}

/// Why the balancer could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not be bound.
    #[error("cannot listen on {address}: {source}")]
    Listen {
        /// The address.
        address: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// A certificate could not be loaded.
    #[error("TLS certificate: {0}")]
    Certificate(#[from] CertError),
    /// rustls refused the TLS settings.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// The control socket cannot be set up.
    #[error("{0}")]
    Control(#[from] UpgradeError),
    /// The shared store's settings cannot be used.
    #[error("{0}")]
    Store(#[from] crate::store::shared::StoreError),
    /// The admin token file cannot be used.
    #[error("admin token file {}: {reason}", path.display())]
    Token {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// Binds a listener of `kind` at the configured `address`, or takes the one a process
/// before this one handed over; a control socket remembers it for the next handover.
async fn bind(
    kind: Kind,
    address: SocketAddr,
    inherited: &Inherited,
    handoff: Option<&Handoff>,
) -> Result<(TcpListener, SocketAddr), StartError> {
    let fail = |source| StartError::Listen { address, source };
    let (listener, local) = match inherited.tcp(kind, address) {
        Some(listener) => {
            let listener = TcpListener::from_std(listener).map_err(fail)?;
            let local = listener.local_addr().map_err(fail)?;
            (listener, local)
        }
        None => bind_new(address).await?,
    };
    if let Some(handoff) = handoff {
        let fd = listener.as_fd().try_clone_to_owned().map_err(fail)?;
        handoff.keep(kind, &address.to_string(), &local.to_string(), fd);
    }
    Ok((listener, local))
}

async fn bind_new(address: SocketAddr) -> Result<(TcpListener, SocketAddr), StartError> {
    let fail = |source| StartError::Listen { address, source };
    let socket = if address.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(fail)?;
    socket.set_reuseaddr(true).map_err(fail)?;
    // Linux hands TCP_NODELAY down to every accepted connection: one system call here
    // instead of one per connection (elsewhere the listener sets it per connection).
    socket.set_nodelay(true).map_err(fail)?;
    socket.bind(address).map_err(fail)?;
    let listener = socket.listen(LISTEN_BACKLOG).map_err(fail)?;
    let local = listener.local_addr().map_err(fail)?;
    Ok((listener, local))
}

/// Pending connections the kernel may queue per listener (capped by `net.core.somaxconn`).
const LISTEN_BACKLOG: u32 = 4096;

/// Loads and checks the certificates of a TLS configuration (what `tidegate check` and
/// start-up both do): every bad file is an error naming it, an expired certificate or a key
/// other users may read a warning.
pub fn load_certificates(tls: &TlsConfig) -> Result<CertStore, CertError> {
    let store = CertStore::load(&tls.certificates, &tls::provider())?;
    tls::warn_expired(&store);
    tls::warn_readable_keys(&tls.certificates);
    Ok(store)
}

/// What starting takes besides the configuration.
#[derive(Debug, Default, Clone)]
pub struct Options {
    /// The file the configuration came from: SIGHUP and `POST /api/reload` re-read it.
    pub config_path: Option<PathBuf>,
    /// `--admin-token-file`: wins over the file's `admin_token_file` and over
    /// `TIDEGATE_ADMIN_TOKEN`.
    pub admin_token_file: Option<PathBuf>,
    /// `--state-file`: wins over the file's `state_file`.
    pub state_file: Option<PathBuf>,
    /// `--control-socket`: wins over the file's `control_socket`.
    pub control_socket: Option<PathBuf>,
    /// `--store`: the shared store's settings, with the URL the flag gave (wins over the
    /// file's `[store] redis`).
    pub store: Option<crate::config::StoreConfig>,
    /// Listening sockets a process before this one handed over (`--upgrade`).
    pub inherited: Arc<Inherited>,
    /// Pins a process before this one handed over, in the state file's form: restored
    /// instead of the state file's.
    pub pins: Option<Vec<u8>>,
    /// The program and arguments that start this tidegate again, for `tidegate upgrade`.
    pub successor_command: Option<(PathBuf, Vec<OsString>)>,
    /// What the admin API changed in the farm of a process before this one (`--upgrade`),
    /// kept where the file did not change the same thing.
    pub farm_changes: Vec<crate::farm::carry::BackendChange>,
    /// The service manager's notification socket (`NOTIFY_SOCKET`), if it listens.
    pub notifier: Option<Arc<Notifier>>,
}

/// Binds every listener and starts serving (a configuration that came from no file).
pub async fn start(config: &Config) -> Result<Running, StartError> {
    start_with(config, Options::default()).await
}

/// The admin API's token: `--admin-token-file`, else the file's `admin_token_file`, else
/// `TIDEGATE_ADMIN_TOKEN`; none means changes through the API are refused.
fn admin_token(config: &Config, options: &Options) -> Result<Option<String>, StartError> {
    let file = options
        .admin_token_file
        .as_ref()
        .or(config.admin_token_file.as_ref());
    if let Some(path) = file {
        let text = std::fs::read_to_string(path).map_err(|e| StartError::Token {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let token = text.trim();
        if token.is_empty() {
            return Err(StartError::Token {
                path: path.clone(),
                reason: "the file is empty".into(),
            });
        }
        return Ok(Some(token.to_string()));
    }
    Ok(std::env::var("TIDEGATE_ADMIN_TOKEN")
        .ok()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty()))
}

/// Binds every listener and starts serving.
pub async fn start_with(config: &Config, options: Options) -> Result<Running, StartError> {
    let started = Instant::now();
    // Taken over first, so a SIGHUP from here on never kills the process.
    let hangup = watch_hangup();
    let token = admin_token(config, &options)?;
    let registry = Arc::new(Registry::new(farm::topology(config)));
    // The admin API's changes of the tidegate before this one (before its pins: a backend
    // the API added keeps its sessions).
    farm::carry::apply(&registry, config, &options.farm_changes);
    // The pins of the tidegate before this one, before the first request: handed over by
    // a running one, or read from the state file.
    let state = state_file(config, &options);
    if let Some(pins) = options.pins.clone() {
        let registry = registry.clone();
        let _ = tokio::task::spawn_blocking(move || {
            upgrade::merge(
                &registry,
                &pins,
                "pins taken over from the running tidegate",
            )
        })
        .await;
    } else if let Some(state) = &state {
        let (state, registry) = (state.clone(), registry.clone());
        let _ = tokio::task::spawn_blocking(move || state.restore(&registry)).await;
    }
    let inherited = options.inherited.clone();
    let control = match options
        .control_socket
        .clone()
        .or_else(|| config.control_socket(options.state_file.as_deref()))
    {
        Some(path) => Some(Handoff::bind(
            &path,
            registry.clone(),
            &inherited,
            options.successor_command.clone(),
            options.pins.is_some(),
            options.notifier.clone(),
        )?),
        None => None,
    };
    let handoff = control.as_ref().map(|(h, _)| h.clone());
    // Images left running by a tidegate before this one keep their sessions: adopted before
    // the first request could launch them twice.
    farm::launch::adopt_running(&registry).await;
    // The shared store, after the pins of the process before (they are in the store
    // already) and before the first request.
    let store = match options.store.as_ref().or(config.store.as_ref()) {
        Some(settings) => {
            let store = SharedPins::connect(settings).await?;
            store.attach(&registry);
            Some(store)
        }
        None => None,
    };
    let upstream = Arc::new(upstream::Upstream::new(
        &config.upstream,
        config.client_timeout,
    ));
    let proxy = Arc::new(
        Proxy::new(
            registry.clone(),
            upstream.clone(),
            config.max_connections,
            config.client_timeout,
            config.tunnel_timeout,
        )
        .with_trusted_proxies(config.trusted_proxies.clone())
        .with_http2_limits(config.http2_max_streams, config.http2_max_requests)
        .with_store(store.clone()),
    );
    // Everything that can fail comes before the first accept: a process taking over that
    // fails here has accepted nothing, and the one it would replace serves on.
    let tls = match &config.tls {
        Some(tls) => {
            // The files' times before they are read: a change from here on is seen by the
            // check.
            let stamps = tls::stamps(&tls.certificates);
            let resolver = Arc::new(CertResolver::new(load_certificates(tls)?));
            let front = TlsFront {
                acceptor: TlsAcceptor::from(tls::server_config(resolver.clone(), tls.min_version)?),
                hsts: tls
                    .hsts
                    .as_ref()
                    .and_then(|h| HeaderValue::try_from(h.as_str()).ok()),
            };
            Some((tls, stamps, resolver, front))
        }
        None => None,
    };
    let handoff_ref = handoff.as_deref();
    let mut plain = Vec::with_capacity(config.listen.len());
    for &address in &config.listen {
        plain.push(bind(Kind::Http, address, &inherited, handoff_ref).await?);
    }
    let (mut secure, mut redirects) = (Vec::new(), Vec::new());
    if let Some((tls, ..)) = &tls {
        for &address in &tls.listen {
            secure.push(bind(Kind::Tls, address, &inherited, handoff_ref).await?);
        }
        for &address in &tls.redirect_http {
            redirects.push(bind(Kind::Redirect, address, &inherited, handoff_ref).await?);
        }
    }
    let admin_listener = match config.admin {
        AdminListen::Off => None,
        AdminListen::Configured(address) => {
            Some(bind(Kind::Admin, address, &inherited, handoff_ref).await?)
        }
        AdminListen::Default(address) => {
            match bind(Kind::Admin, address, &inherited, handoff_ref).await {
                Ok(bound) => Some(bound),
                Err(e) => {
                    tracing::warn!(
                        "{e}; running without the admin listener (set `admin` to choose another address)"
                    );
                    None
                }
            }
        }
    };

    let (shutdown, stop) = shutdown::channel();
    let mut tasks = JoinSet::new();
    let mut addrs = Vec::with_capacity(plain.len());
    for (listener, local) in plain {
        tracing::info!(address = %local, "listening (HTTP/1.1, h2c)");
        addrs.push(local);
        tasks.spawn(listener::serve(
            listener,
            proxy.clone(),
            stop.clone(),
            None,
            config.shutdown_timeout,
        ));
    }
    let mut tls_addrs = Vec::new();
    let mut redirect_addrs = Vec::new();
    let mut certificates = None;
    let mut reloader = None;
    if let Some((tls, stamps, resolver, front)) = tls {
        for (listener, local) in secure {
            tracing::info!(address = %local, "listening (TLS: HTTP/1.1, h2)");
            tls_addrs.push(local);
            tasks.spawn(listener::serve(
                listener,
                proxy.clone(),
                stop.clone(),
                Some(front.clone()),
                config.shutdown_timeout,
            ));
        }
        let https_port = tls_addrs[0].port();
        for (listener, local) in redirects {
            tracing::info!(address = %local, "redirecting HTTP to HTTPS");
            redirect_addrs.push(local);
            tasks.spawn(listener::redirect_to_https(
                listener,
                https_port,
                proxy.connection_slots.clone(),
                config.client_timeout,
                stop.clone(),
            ));
        }
        let watcher = Arc::new(tls::Reloader::new(
            resolver.clone(),
            tls.certificates.clone(),
            stamps,
        ));
        if let Some(every) = tls.reload_check_interval {
            tasks.spawn(watcher.clone().watch(every, stop.clone()));
        }
        reloader = Some(watcher);
        certificates = Some(resolver);
    }
    let farm = Arc::new(
        Farm::new(
            registry.clone(),
            upstream,
            config.clone(),
            options.config_path.clone(),
            reloader,
            state.clone(),
        )
        .with_store(store.clone()),
    );
    if let Some(store) = store {
        tasks.spawn(store.run(registry.clone(), stop.clone()));
    }
    if let Some(handoff) = &handoff {
        handoff.serve_farm(farm.clone());
    }
    if let Some(state) = state {
        tasks.spawn(state.keep(registry.clone(), stop.clone()));
    }
    if let Some(hangup) = hangup {
        tasks.spawn(reload_on_hangup(farm.clone(), hangup, stop.clone()));
    }
    tasks.spawn(farm::housekeeping(
        registry.clone(),
        farm.upstream.clone(),
        stop.clone(),
    ));
    tasks.spawn(farm::health::probe(registry.clone(), stop.clone()));
    let admin_addr = admin_listener.map(|(listener, local)| {
        tracing::info!(
            address = %local,
            api = if token.is_some() { "changes need the bearer token" } else { "read-only: no admin token configured" },
            "admin: /metrics /status /healthz /api"
        );
        tasks.spawn(admin::serve(
            listener,
            admin::Admin::new(proxy.clone(), farm.clone(), token, started),
            config.client_timeout,
            stop.clone(),
        ));
        local
    });
    if let Some((handoff, listener)) = control {
        tracing::info!(path = %handoff.path().display(), "control socket: upgrades with `tidegate upgrade` or `--upgrade`");
        tasks.spawn(upgrade::serve(listener, handoff, stop.clone()));
    }
    for pool in registry.topology().pools.iter() {
        for b in pool.backends().all() {
            tracing::info!(pool = %pool.name, backend = %b.name, address = %b.address, id = %b.id, state = b.admin().as_str(), "backend");
        }
    }
    Ok(Running {
        addrs,
        admin_addr,
        tls_addrs,
        redirect_addrs,
        certificates,
        farm,
        proxy,
        handoff,
        notifier: options.notifier,
        shutdown,
        tasks,
        predecessor: None,
        shutdown_timeout: config.shutdown_timeout,
    })
}

/// The state file: `--state-file`, else the file's `state_file`.
fn state_file(config: &Config, options: &Options) -> Option<Arc<StateFile>> {
    let interval = config.state.as_ref().map_or(
        std::time::Duration::from_secs(crate::config::DEFAULT_STATE_INTERVAL),
        |(_, i)| *i,
    );
    let path = options
        .state_file
        .as_ref()
        .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone()))
        .or_else(|| config.state.as_ref().map(|(p, _)| p.clone()))?;
    Some(Arc::new(StateFile::new(path, interval)))
}

/// The SIGHUP stream, if the platform gives one.
type HangupSignal = tokio::signal::unix::Signal;

fn watch_hangup() -> Option<HangupSignal> {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!("cannot watch SIGHUP: {e}");
            None
        }
    }
}

/// SIGHUP re-reads the configuration file and applies what changed (and reloads the
/// certificates); started from flags, it reloads the certificates only.
async fn reload_on_hangup(farm: Arc<Farm>, mut hangup: HangupSignal, mut stop: Signal) {
    loop {
        tokio::select! {
            _ = hangup.recv() => {
                if let Err(ReloadError::NoFile) = farm.reload("SIGHUP").await {
                    tracing::info!("SIGHUP: no configuration file to re-read (started from flags); certificates, if any, were reloaded");
                }
            }
            _ = stop.wait() => return,
        }
    }
}

impl Running {
    /// The bound admin listener address, if it runs.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The bound TLS listener addresses.
    pub fn tls_addrs(&self) -> &[SocketAddr] {
        &self.tls_addrs
    }

    /// The bound HTTP→HTTPS redirect listener addresses.
    pub fn redirect_addrs(&self) -> &[SocketAddr] {
        &self.redirect_addrs
    }

    /// The certificates in use, when TLS is configured.
    pub fn certificates(&self) -> Option<Arc<CertStore>> {
        self.certificates.as_ref().map(|r| r.store())
    }

    /// The bound listener addresses, in configuration order.
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// The pool named `name`, as it is now.
    pub fn pool(&self, name: &str) -> Option<Arc<Pool>> {
        self.farm.registry.topology().pool(name).cloned()
    }

    /// The farm's registry.
    pub fn registry(&self) -> Arc<Registry> {
        self.farm.registry.clone()
    }

    /// The control socket's side of upgrades, when there is a control socket.
    pub fn handoff(&self) -> Option<&Arc<Handoff>> {
        self.handoff.as_ref()
    }

    /// Tells the service manager (`READY=1`) that every listener is bound and serves. Not
    /// for a process that took over from another: that one names it (`MAINPID=`) instead.
    pub fn ready(&self) {
        if let Some(notifier) = &self.notifier {
            let listeners = self.addrs.len() + self.tls_addrs.len() + self.redirect_addrs.len();
            notifier.ready(&format!(
                "serving on {listeners} listeners{}",
                match self.admin_addr {
                    Some(admin) => format!(", admin on {admin}"),
                    None => String::new(),
                }
            ));
        }
    }

    /// Runs until `signal` resolves or a new tidegate took over, then shuts down gracefully.
    /// A signal is told to the service manager (`STOPPING=1`); a handover is not, as the new
    /// process is the service's main one by then.
    pub async fn run_until(self, signal: impl std::future::Future<Output = ()>) {
        let handoff = self.handoff.clone();
        let handed_over = async {
            match &handoff {
                Some(h) => h.handed_over().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = signal => {
                tracing::info!("shutting down");
                if let Some(notifier) = &self.notifier {
                    notifier.stopping();
                }
            }
            () = handed_over => {
                tracing::info!("shutting down: a new tidegate took over");
                self.proxy.hand_over();
            }
        }
        self.shutdown().await;
    }

    /// Follows `predecessor`, the tidegate this one took over from: a stop waits for it to
    /// finish its requests (a service manager stopping this one, its main process, kills
    /// what is left of the service once it exits).
    pub fn follows(&mut self, predecessor: upgrade::Predecessor) {
        self.predecessor = Some(predecessor);
    }

    /// Stops serving without touching the state file or the images: an upgrade that the
    /// running tidegate gave up on (it serves on, and they are its own).
    pub async fn abandon(mut self) {
        self.shutdown.fire();
        while self.tasks.join_next().await.is_some() {}
    }

    /// Stops accepting, lets requests in flight finish, stops the sweepers, and then either
    /// hands the pins to the tidegate that took over, or writes the state file and stops
    /// the images launched with `stop_on_exit`.
    pub async fn shutdown(mut self) {
        self.shutdown.fire();
        while self.tasks.join_next().await.is_some() {}
        // Its last pins come before this one's state file is written.
        if let Some(mut predecessor) = self.predecessor.take()
            && !predecessor.done()
        {
            tracing::info!(
                "waiting for the tidegate this one took over from to finish its requests (at most shutdown_timeout)"
            );
            let _ = tokio::time::timeout(self.shutdown_timeout, predecessor.finished()).await;
        }
        if let Some(handoff) = self.handoff.clone()
            && tokio::task::spawn_blocking(move || handoff.finish())
                .await
                .unwrap_or(false)
        {
            return;
        }
        if let Some(state) = self.farm.state.clone() {
            let registry = self.farm.registry.clone();
            let _ =
                tokio::task::spawn_blocking(move || state.save_logged(&registry, "shutdown")).await;
        }
        farm::launch::on_exit(&self.farm.registry).await;
    }
}

/// Descriptors tidegate needs beyond its connections: listeners, log, certificates, epoll.
const SPARE_FILES: u64 = 64;

/// The descriptors a configuration may need at its limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileBudget {
    /// Client connections (`max_connections`).
    pub clients: u64,
    /// Backend connections of requests in flight: one per HTTP/1 connection, and up to
    /// `http2_max_requests` for HTTP/2's streams.
    pub in_flight: u64,
    /// Idle backend connections kept for reuse (`max_idle_per_backend` per backend).
    pub idle: u64,
}

impl FileBudget {
    /// What `config` may take.
    pub fn of(config: &Config) -> FileBudget {
        let backends: usize = config.pools.iter().map(|p| p.backends.len()).sum();
        FileBudget {
            clients: config.max_connections as u64,
            in_flight: (config.max_connections + config.http2_max_requests) as u64,
            idle: (backends * config.upstream.max_idle_per_backend) as u64,
        }
    }

    /// All of it, with the descriptors beyond connections.
    pub fn total(&self) -> u64 {
        self.clients + self.in_flight + self.idle + SPARE_FILES
    }
}

/// Raises the soft limit on open files to the hard one, as Go's runtime does at start: a
/// client connection and its backend connection take a descriptor each, and the soft default
/// of many systems (1024) would stop tidegate at a few hundred clients. Says what it did,
/// and warns when even the hard limit is short of what `config` may need at its limits
/// ([`FileBudget`]).
#[cfg(unix)]
pub fn raise_open_files_limit(config: &Config) {
    let budget = FileBudget::of(config);
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let Some(soft) = limit.current else {
        return; // Unlimited.
    };
    let mut usable = soft;
    // An unlimited hard limit still has a kernel ceiling (Linux: fs.nr_open, 1 << 20 by
    // default); macOS refuses more than OPEN_MAX whatever the hard limit says, as Go found.
    let target = if cfg!(target_os = "macos") {
        limit.maximum.unwrap_or(u64::MAX).min(10_240)
    } else {
        limit.maximum.unwrap_or(1 << 20)
    };
    if target > soft {
        let raised = rustix::process::Rlimit {
            current: Some(target),
            maximum: limit.maximum,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => {
                usable = target;
                tracing::info!("open files limit raised from {soft} to {target}");
            }
            Err(e) => tracing::warn!("cannot raise the open files limit from {soft}: {e}"),
        }
    }
    if usable < budget.total() {
        tracing::warn!(
            "open files limit {usable} is short of the {} descriptors tidegate may need at its \
             limits: {} client connections (max_connections), {} backend connections of \
             requests in flight (one per HTTP/1 connection, up to http2_max_requests for \
             HTTP/2), {} idle backend connections (max_idle_per_backend per backend), and {} \
             more; raise it (LimitNOFILE=, ulimit -n) or lower those limits, else connections \
             may be refused under load",
            budget.total(),
            budget.clients,
            budget.in_flight,
            budget.idle,
            SPARE_FILES
        );
    }
}
