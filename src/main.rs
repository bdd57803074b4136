//! The `tidegate` command: parse the flags, load and validate the config, run.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, CommandFactory, Parser, Subcommand};
use tidegate::config::{
    AffinityMode, BackendFile, CertFile, Config, FileConfig, LogFormat, PolicyName, PoolFile,
    TlsFile,
};
use tidegate::demo::{Image, ImageOptions};
use tidegate::error::ConfigError;
use tidegate::log_output::{self, Flusher};
use tidegate::manual::Shell;

/// A session-affinity load balancer for Seaside farms and other stateful HTTP apps.
///
/// tidegate keeps every request of a session on the backend that holds it: it reads the
/// session id where the application puts it (a query or form field, a cookie, a
/// `;jsessionid=` path parameter), learns each pin from what the backend sends back, and
/// spreads new sessions over the backends.
///
/// It serves with a configuration file (--config FILE), or with one pool built from the
/// quick-start options (--backend ADDR, repeatable). SIGHUP re-reads the configuration file and
/// applies what changed; SIGTERM or Ctrl-C stops once the requests in flight have finished.
/// The configuration reference, docs/configuration.md, is in /usr/share/doc/tidegate when
/// installed from the package; `tidegate man` prints the manual page.
#[derive(Parser, Debug)]
#[command(
    name = "tidegate",
    version = tidegate::VERSION,
    override_usage = "tidegate --config FILE [OPTIONS]\n       \
                      tidegate --backend [NAME=]ADDR... [QUICK-START OPTIONS] [OPTIONS]\n       \
                      tidegate COMMAND",
    after_help = "Examples:
  tidegate --config /etc/tidegate/tidegate.toml
  tidegate check --config /etc/tidegate/tidegate.toml
  tidegate --backend 10.0.0.11:8080 --backend 10.0.0.12:8080
  tidegate --listen 0.0.0.0:8080 --backend img1=10.0.0.11:8080 --backend img2=10.0.0.12:8080 \\
           --policy least-sessions --session-cookie _s --session-cookie counter
  tidegate demo"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Validate a configuration file without serving.
    ///
    /// Parses and validates the file exactly as the server does and, when it has a [tls]
    /// table, loads every certificate and key. Prints one line and exits 0 when the file is
    /// valid; prints the error, naming the key and line, and exits 2 when it is not. Binds
    /// nothing and contacts no backend.
    #[command(after_help = "Example:\n  tidegate check --config /etc/tidegate/tidegate.toml")]
    Check {
        /// The configuration file.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Run three Seaside-like demo images and the balancer in front of them.
    ///
    /// Serves http://ADDR/app (HTTPS on port + 363 too, when run from the repository with its
    /// development certificate in certs/), with the live status page and the admin API on
    /// 127.0.0.1:9090 when that is free, and prints the tidegate ctl command line that
    /// changes the farm while it serves. Ctrl-C stops it.
    Demo {
        /// Where the balancer listens.
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Start with every image stopped: tidegate launches each (as a child process) when
        /// sessions need it, and stops it when its sessions are gone.
        #[arg(long = "on-demand")]
        on_demand: bool,
    },
    /// Run one Seaside-like demo image on its own (what `demo --on-demand` launches).
    Image {
        /// Where the image listens.
        #[arg(long, value_name = "ADDR")]
        listen: SocketAddr,
        /// The name its pages show.
        #[arg(long, default_value = "image")]
        name: String,
    },
    /// Replace the running tidegate with a new one, without refusing a connection.
    ///
    /// Asks the tidegate running on the control socket to start its successor from the same
    /// program path and arguments (after installing a new version, say): the new one takes
    /// over the listening sockets and pins, the old one finishes its requests and exits.
    /// Exits 0 once the new one serves; 1 if it could not start (the old one keeps serving)
    /// or nothing answers on the socket; 2 without a control socket to use.
    #[command(after_help = "Examples:
  tidegate upgrade --config /etc/tidegate/tidegate.toml
  tidegate upgrade --control-socket /run/tidegate/control.sock")]
    Upgrade {
        /// The running tidegate's control socket.
        #[arg(
            long = "control-socket",
            value_name = "PATH",
            conflicts_with = "config"
        )]
        control_socket: Option<PathBuf>,
        /// Find the control socket in this configuration file (`control_socket`, or beside
        /// its `state_file`).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Read and change a running farm through its admin API.
    ///
    /// One request to the admin listener per command, the answer printed as a line or a
    /// table. Reading needs nothing; changes need the admin token the server was given
    /// (admin_token_file, --admin-token-file or TIDEGATE_ADMIN_TOKEN): --token-file FILE, else
    /// the TIDEGATE_ADMIN_TOKEN variable. The options go before the command. Exits 0 when the
    /// change was made, 1 when the API refused it, 2 when the admin listener could not be
    /// reached, the token could not be read, or the answer was not understood.
    #[command(after_help = "Examples:
  tidegate ctl pools
  tidegate ctl --token-file /etc/tidegate/admin.token drain shop shop-2
  tidegate ctl --token-file /etc/tidegate/admin.token add shop shop-4 10.0.0.14:8080 --weight 2
  tidegate ctl --admin 10.0.9.1:9090 --token-file admin.token reload")]
    Ctl {
        /// The admin listener of the running tidegate.
        #[arg(long, value_name = "ADDR", default_value = tidegate::config::DEFAULT_ADMIN)]
        admin: SocketAddr,
        /// A file holding the admin token (default: the TIDEGATE_ADMIN_TOKEN variable).
        #[arg(long = "token-file", value_name = "FILE")]
        token_file: Option<PathBuf>,
        #[command(subcommand)]
        action: tidegate::ctl::Command,
    },
    /// Print the manual page (roff) on standard output.
    ///
    /// One page, tidegate(1), covering every command, generated from the same definitions as
    /// --help. The Debian package installs it; from a build, read it with
    /// `tidegate man | man -l -`.
    #[command(after_help = "Example:\n  tidegate man > /usr/local/share/man/man1/tidegate.1")]
    Man,
    /// Print the shell completion script for bash, zsh or fish on standard output.
    ///
    /// The Debian package installs all three. From a build, install the one of your shell in
    /// its completion directory, or load it into the running shell.
    #[command(after_help = "Examples:
  source <(tidegate completions bash)
  tidegate completions bash > /usr/share/bash-completion/completions/tidegate
  tidegate completions zsh > /usr/share/zsh/vendor-completions/_tidegate
  tidegate completions fish > ~/.config/fish/completions/tidegate.fish")]
    Completions {
        /// bash, zsh or fish.
        #[arg(value_enum, hide_possible_values = true)]
        shell: Shell,
    },
}

/// Options of the server. The quick-start ones build a single pool and cannot be combined
/// with --config; the others go with either.
#[derive(Args, Debug)]
struct RunArgs {
    /// Read the configuration from this TOML file.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["listen", "listen_tls", "tls_cert", "tls_key", "backend", "affinity", "session_cookie", "session_param", "policy", "admin", "log_format", "threads"])]
    config: Option<PathBuf>,
    /// A file holding the admin API's bearer token (wins over the file's
    /// `admin_token_file` and over TIDEGATE_ADMIN_TOKEN).
    #[arg(long = "admin-token-file", value_name = "FILE")]
    admin_token_file: Option<PathBuf>,
    /// A file the pins are kept in across restarts (wins over the file's `state_file`).
    #[arg(long = "state-file", value_name = "FILE")]
    state_file: Option<PathBuf>,
    /// The Unix socket upgrades go through (wins over the file's `control_socket`; default:
    /// the state file's path plus `.sock`).
    #[arg(long = "control-socket", value_name = "PATH")]
    control_socket: Option<PathBuf>,
    /// Share pins with other instances through this Redis: `redis://host:port/db`, or
    /// `rediss://` for TLS (wins over the file's `[store] redis`; its other keys apply).
    #[arg(long = "store", value_name = "URL")]
    store: Option<String>,
    /// Take over the listening sockets and pins of the tidegate running on the control
    /// socket, serve, then let it finish its requests and exit: an upgrade without a
    /// refused connection. If this one cannot start, the running one keeps serving.
    #[arg(long)]
    upgrade: bool,

    /// A backend, `ADDR` or `NAME=ADDR` (repeatable; at least one without --config).
    #[arg(long, value_name = "[NAME=]ADDR", help_heading = QUICK_START)]
    backend: Vec<String>,
    /// Listen on this address (repeatable; default 127.0.0.1:8080 without --listen-tls).
    #[arg(long, value_name = "ADDR", help_heading = QUICK_START)]
    listen: Vec<SocketAddr>,
    /// Listen with TLS on this address (repeatable); needs --tls-cert and --tls-key.
    #[arg(long = "listen-tls", value_name = "ADDR", help_heading = QUICK_START)]
    listen_tls: Vec<SocketAddr>,
    /// A PEM certificate chain (repeatable, paired in order with --tls-key; the first is the
    /// default for clients without SNI).
    #[arg(long = "tls-cert", value_name = "FILE", help_heading = QUICK_START)]
    tls_cert: Vec<PathBuf>,
    /// The PEM private key of the --tls-cert at the same position.
    #[arg(long = "tls-key", value_name = "FILE", help_heading = QUICK_START)]
    tls_key: Vec<PathBuf>,
    /// How clients stay on their backend (default: session).
    #[arg(long, value_enum, value_name = "MODE", help_heading = QUICK_START)]
    affinity: Option<AffinityMode>,
    /// How new sessions are spread (default: round-robin).
    #[arg(long, value_enum, value_name = "POLICY", help_heading = QUICK_START)]
    policy: Option<PolicyName>,
    /// A cookie carrying the session id (repeatable; default `_s`).
    #[arg(long = "session-cookie", value_name = "NAME", help_heading = QUICK_START)]
    session_cookie: Vec<String>,
    /// The query and form field carrying the session id (default `_s`).
    #[arg(long = "session-param", value_name = "NAME", help_heading = QUICK_START)]
    session_param: Option<String>,
    /// The admin listener (`/metrics`, `/status`, `/healthz`, the `/api` that `tidegate ctl`
    /// drives): an address, or `off` (default 127.0.0.1:9090).
    #[arg(long, value_name = "ADDR|off", help_heading = QUICK_START)]
    admin: Option<String>,
    /// Log line format (default: text).
    #[arg(long = "log-format", value_enum, value_name = "FORMAT", help_heading = QUICK_START)]
    log_format: Option<LogFormat>,
    /// Worker threads (default: one per available core).
    #[arg(long, value_name = "N", help_heading = QUICK_START)]
    threads: Option<usize>,
}

/// The heading of the options that build a pool from the command line.
const QUICK_START: &str = "Quick-start options (one pool, not with --config)";

impl RunArgs {
    /// The quick-start flags as a one-pool file config, validated like a file.
    fn to_config(&self) -> Result<Config, ConfigError> {
        let flag_error = |key: &str, message: String| ConfigError::Invalid {
            file: "command line".into(),
            line: None,
            key: key.into(),
            message,
        };
        let mut backends = Vec::with_capacity(self.backend.len());
        for spec in &self.backend {
            let (name, addr) = match spec.split_once('=') {
                Some((n, a)) => (Some(n.to_string()), a),
                None => (None, spec.as_str()),
            };
            let address = addr
                .parse()
                .map_err(|e| flag_error("--backend", format!("{spec:?}: {e}")))?;
            backends.push(BackendFile::at(address, name));
        }
        let mut pool = PoolFile {
            backends,
            ..PoolFile::default()
        };
        if let Some(a) = self.affinity {
            pool.affinity = a;
        }
        if let Some(p) = self.policy {
            pool.policy = p;
        }
        if !self.session_cookie.is_empty() || self.session_param.is_some() {
            let session = pool.session.get_or_insert_with(Default::default);
            if !self.session_cookie.is_empty() {
                session.cookies = self.session_cookie.clone();
            }
            if let Some(p) = &self.session_param {
                session.param = p.clone();
            }
        }
        if self.tls_cert.len() != self.tls_key.len() {
            return Err(flag_error(
                "--tls-cert",
                format!(
                    "{} certificates but {} keys: give --tls-cert and --tls-key in pairs",
                    self.tls_cert.len(),
                    self.tls_key.len()
                ),
            ));
        }
        let tls = (!self.tls_cert.is_empty()).then(|| TlsFile {
            certificates: self
                .tls_cert
                .iter()
                .zip(&self.tls_key)
                .map(|(cert, key)| CertFile {
                    cert: cert.clone(),
                    key: key.clone(),
                })
                .collect(),
            ..TlsFile::default()
        });
        let file = FileConfig {
            admin: self.admin.clone(),
            log_format: self.log_format.unwrap_or_default(),
            workers: self.threads.unwrap_or(0),
            listen: self.listen.clone(),
            listen_tls: self.listen_tls.clone(),
            tls,
            pools: vec![pool],
            ..FileConfig::default()
        };
        file.validate(std::path::Path::new("")).map_err(|inv| {
            let flag = match inv.key.rsplit('.').next().unwrap_or("") {
                k if k.starts_with("backend") || k == "name" => "--backend",
                k if k.starts_with("cookies") => "--session-cookie",
                "listen_tls" => "--listen-tls",
                "admin" => "--admin",
                "workers" => "--threads",
                k if k.starts_with("listen_tls") => "--listen-tls",
                k if k.starts_with("listen") => "--listen",
                "tls" | "certificate" => "--tls-cert",
                "param" => "--session-param",
                "session" => "--affinity",
                _ => "flags",
            };
            flag_error(flag, inv.message)
        })
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // rustls' crypto provider, chosen once for the whole process: aws-lc-rs.
    tidegate::tls::provider();
    match cli.command {
        Some(Command::Man) => print_bytes(&tidegate::manual::man_page(Cli::command())),
        Some(Command::Completions { shell }) => {
            print_bytes(&tidegate::manual::completions(shell, Cli::command()))
        }
        Some(Command::Check { config }) => match check(&config) {
            Ok(c) => {
                let backends: usize = c.pools.iter().map(|p| p.backends.len()).sum();
                let launched = c
                    .pools
                    .iter()
                    .flat_map(|p| &p.backends)
                    .filter(|b| b.launch.is_some())
                    .count();
                let backends = match launched {
                    0 => format!("{backends} backends"),
                    n => format!("{backends} backends, {n} launched on demand"),
                };
                let tls = c.tls.as_ref().map_or(0, |t| t.listen.len());
                println!(
                    "{}: ok ({} pools, {backends}, {} listeners, {tls} TLS listeners)",
                    config.display(),
                    c.pools.len(),
                    c.listen.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(2)
            }
        },
        Some(Command::Upgrade {
            control_socket,
            config,
        }) => {
            let path = match (control_socket, config) {
                (Some(path), _) => path,
                (None, Some(file)) => match Config::from_file(&file) {
                    Ok(c) => match c.control_socket(None) {
                        Some(path) => path,
                        None => {
                            eprintln!(
                                "tidegate upgrade: {}",
                                tidegate::upgrade::UpgradeError::NoControlSocket
                            );
                            return ExitCode::from(2);
                        }
                    },
                    Err(e) => {
                        eprintln!("{e}");
                        return ExitCode::from(2);
                    }
                },
                (None, None) => {
                    eprintln!("tidegate upgrade: give --control-socket PATH or --config FILE");
                    return ExitCode::from(2);
                }
            };
            match tidegate::upgrade::request_successor(&path) {
                Ok(pid) => {
                    println!(
                        "upgraded: the new tidegate (pid {pid}) serves; the old one finishes its requests and exits"
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("tidegate upgrade: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Some(Command::Ctl {
            admin,
            token_file,
            action,
        }) => {
            let token = match tidegate::ctl::token(token_file.as_deref()) {
                Ok(t) => t,
                Err(f) => {
                    eprintln!("tidegate ctl: {}", f.message);
                    return ExitCode::from(f.status);
                }
            };
            match tidegate::ctl::run(admin, token.as_deref(), &action) {
                Ok(out) => {
                    print!("{out}");
                    ExitCode::SUCCESS
                }
                Err(f) => {
                    eprintln!("tidegate ctl: {}", f.message);
                    ExitCode::from(f.status)
                }
            }
        }
        Some(Command::Demo { listen, on_demand }) => {
            let _logs = init_logs(LogFormat::Text);
            run(0, async move { demo(listen, on_demand).await })
        }
        Some(Command::Image { listen, name }) => run(1, async move {
            let image = Image::start(listen, ImageOptions::new(&name))
                .await
                .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
            eprintln!("demo image {name} serving on {}", image.addr);
            shutdown_signal().await;
            Ok(())
        }),
        None => {
            let config = match &cli.run.config {
                Some(path) => Config::from_file(path),
                None if cli.run.backend.is_empty() => {
                    eprintln!(
                        "tidegate: give --config FILE, or --backend ADDR (repeatable); \
                         `tidegate demo` runs a demo farm"
                    );
                    return ExitCode::from(2);
                }
                None => cli.run.to_config(),
            };
            // What `tidegate upgrade` starts again: the program at the path it was started
            // from (a package upgrade puts the new version there) with the same arguments.
            let successor_command = std::env::current_exe()
                .ok()
                .map(|exe| (exe, std::env::args_os().skip(1).collect()));
            let options = tidegate::server::Options {
                config_path: cli.run.config.clone(),
                admin_token_file: cli.run.admin_token_file.clone(),
                state_file: cli.run.state_file.clone(),
                control_socket: cli.run.control_socket.clone(),
                successor_command,
                ..Default::default()
            };
            let upgrade = cli.run.upgrade;
            match config {
                Ok(config) => {
                    let options = match store_settings(&config, cli.run.store.as_deref()) {
                        Ok(store) => tidegate::server::Options { store, ..options },
                        Err(e) => {
                            eprintln!("tidegate: --store: {e}");
                            return ExitCode::from(2);
                        }
                    };
                    let _logs = init_logs(config.log_format);
                    run(config.workers, async move {
                        serve(config, options, upgrade).await
                    })
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::from(2)
                }
            }
        }
    }
}

/// The shared store `--store URL` asks for: the file's `[store]` settings with that URL, or
/// the defaults. `None` without the flag (the file's own `[store]` applies).
fn store_settings(
    config: &Config,
    url: Option<&str>,
) -> Result<Option<tidegate::config::StoreConfig>, String> {
    let Some(url) = url else {
        return Ok(None);
    };
    let flag = tidegate::config::StoreConfig::from_url(url).map_err(|e| e.message)?;
    Ok(Some(match &config.store {
        Some(file) => tidegate::config::StoreConfig {
            url: flag.url,
            ..file.clone()
        },
        None => flag,
    }))
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`; the access log is the
/// `tidegate::access` target).
fn init_logs(format: LogFormat) -> Flusher {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // rustls warns of every handshake whose client names an IP address in SNI (wrk, some
    // health checkers and scripts do): a client's quirk, not the operator's problem, and a
    // line per connection. Its errors still show; `RUST_LOG=rustls=warn` brings them back.
    let filter = match "rustls=error".parse() {
        Ok(quiet) if !std::env::var("RUST_LOG").is_ok_and(|v| v.contains("rustls")) => {
            filter.add_directive(quiet)
        }
        _ => filter,
    };
    // Written in batches by a thread of its own (see `log_output`); the flusher writes
    // what is left when the process ends.
    let (output, flusher) = log_output::buffered(std::io::stderr());
    // The access log's lines are formatted by the writer thread, in the same format.
    log_output::install_access_log(output.access_log(format));
    // Colours only on a terminal: a log file or journal gets plain text.
    let logs = tracing_subscriber::fmt()
        .with_writer(output)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(filter);
    match format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().flatten_event(true).init(),
    }
    flusher
}

/// Writes generated text (the manual, a completion script) to standard output. A reader that
/// stops early (`tidegate man | head`) is no failure.
fn print_bytes(text: &[u8]) -> ExitCode {
    let mut out = std::io::stdout().lock();
    match out.write_all(text).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tidegate: cannot write to standard output: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Validates a config file and, when it has TLS, loads its certificates.
fn check(path: &std::path::Path) -> Result<Config, String> {
    let _logs = init_logs(LogFormat::Text);
    let config = Config::from_file(path).map_err(|e| e.to_string())?;
    if let Some(tls) = &config.tls {
        tidegate::server::load_certificates(tls).map_err(|e| e.to_string())?;
    }
    Ok(config)
}

/// Runs `main` on a runtime with `workers` threads (0: one per core). One thread gets tokio's
/// single-threaded scheduler (no work stealing, no cross-thread wake-ups), also when "one per
/// core" means one.
fn run(workers: usize, main: impl std::future::Future<Output = Result<(), String>>) -> ExitCode {
    let workers = match workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let mut builder = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    if workers > 1 {
        builder.worker_threads(workers);
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tidegate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(main);
    // What is left is not waited for: everything that must finish (requests in flight, the
    // state file, the images' stops) was awaited; a blocking thread still talking to a
    // successor that never answered must not hold the exit.
    runtime.shutdown_timeout(std::time::Duration::from_millis(500));
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tidegate: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(
    config: Config,
    mut options: tidegate::server::Options,
    upgrade: bool,
) -> Result<(), String> {
    use tidegate::upgrade::{self, UpgradeError};
    #[cfg(unix)]
    tidegate::server::raise_open_files_limit(&config);
    // Under systemd (`Type=notify`): told once every listener serves, and at the stop.
    options.notifier = tidegate::notify::Notifier::from_env().map(std::sync::Arc::new);
    let takeover = if upgrade {
        let path = options
            .control_socket
            .clone()
            .or_else(|| config.control_socket(options.state_file.as_deref()))
            .ok_or_else(|| format!("--upgrade: {}", UpgradeError::NoControlSocket))?;
        let mut takeover = tokio::task::spawn_blocking(move || upgrade::take_over(&path))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("--upgrade: {e}"))?;
        options.inherited = takeover.inherited.clone();
        options.pins = Some(std::mem::take(&mut takeover.pins));
        options.farm_changes = std::mem::take(&mut takeover.farm);
        Some(takeover)
    } else {
        None
    };
    let running = tidegate::server::start_with(&config, options)
        .await
        .map_err(|e| e.to_string())?;
    let mut running = running;
    if let Some(takeover) = takeover {
        let registry = running.registry();
        let told = tokio::task::spawn_blocking(move || takeover.serving(registry))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        match told {
            Ok(predecessor) => running.follows(predecessor),
            Err(e) => {
                // The running one gave up waiting and serves on: this one leaves it be.
                running.abandon().await;
                return Err(format!("--upgrade: {e}"));
            }
        }
        if let Some(handoff) = running.handoff() {
            handoff.open();
        }
        // No READY=1: the process this one replaced names it to the service manager
        // (MAINPID=) now that it serves.
    } else {
        running.ready();
    }
    running.run_until(shutdown_signal()).await;
    Ok(())
}

const DEMO_CERT: &str = "certs/localhost.pem";
const DEMO_KEY: &str = "certs/localhost.key";

/// Sessions per image in `demo --on-demand`: few, so that a second image is launched after
/// a couple of browsers.
const ON_DEMAND_SESSIONS: u32 = 2;
/// Seconds an idle on-demand demo image runs before it is stopped.
const ON_DEMAND_IDLE_STOP: u32 = 20;
/// Seconds a demo session lives without a click, on demand (so images go idle in minutes).
const ON_DEMAND_SESSION_IDLE: u32 = 60;

async fn demo(listen: SocketAddr, on_demand: bool) -> Result<(), String> {
    let names = ["image-1", "image-2", "image-3"];
    let mut images = Vec::new();
    let backends = if on_demand {
        // Each image is this program in its image mode, launched when sessions need it.
        let program = std::env::current_exe()
            .map_err(|e| format!("cannot find this program to launch its images: {e}"))?;
        let mut entries = String::new();
        for name in names {
            let address = free_port().map_err(|e| format!("no free port for {name}: {e}"))?;
            entries.push_str(&format!(
                "[[pool.backend]]\nname = \"{name}\"\naddress = \"{address}\"\n\
                 launch = [{:?}, \"image\", \"--listen\", \"{{host}}:{{port}}\", \"--name\", \"{{name}}\"]\n\
                 max_sessions = {ON_DEMAND_SESSIONS}\nidle_stop = {ON_DEMAND_IDLE_STOP}\nlaunch_timeout = 10\n\
                 stop_timeout = 2\nstop_on_exit = true\n",
                program.display().to_string()
            ));
        }
        format!("[pool.session]\nidle_timeout = {ON_DEMAND_SESSION_IDLE}\n{entries}")
    } else {
        for name in names {
            let image = Image::start(
                "127.0.0.1:0".parse().expect("address"),
                ImageOptions::new(name),
            )
            .await
            .map_err(|e| format!("cannot start demo image {name}: {e}"))?;
            images.push(image);
        }
        images
            .iter()
            .map(|i| {
                format!(
                    "[[pool.backend]]\nname = \"{}\"\naddress = \"{}\"\n",
                    i.name(),
                    i.addr
                )
            })
            .collect()
    };
    let secret = tidegate::demo::random_key(32);
    // With the development certificate in certs/ (run from the repository), an HTTPS
    // listener joins on port + 363 (8080 → 8443).
    let tls_listen = listen
        .port()
        .checked_add(363)
        .map(|port| SocketAddr::new(listen.ip(), port));
    let tls = if let Some(tls_listen) = tls_listen
        && std::path::Path::new(DEMO_CERT).exists()
        && std::path::Path::new(DEMO_KEY).exists()
    {
        format!(
            "listen_tls = [\"{tls_listen}\"]\n[tls]\n[[tls.certificate]]\ncert = \"{DEMO_CERT}\"\nkey = \"{DEMO_KEY}\"\n"
        )
    } else {
        String::new()
    };
    let text = format!(
        "listen = [\"{listen}\"]\n{tls}[[pool]]\nname = \"demo\"\n\
         [pool.affinity_cookie]\nsecret = \"{secret}\"\n{backends}"
    );
    let config = Config::from_toml(&text, "demo").map_err(|e| e.to_string())?;
    // An admin token of its own, so that a newcomer can drain and add images at once.
    let token = DemoToken::write()?;
    let options = tidegate::server::Options {
        admin_token_file: Some(token.0.clone()),
        ..Default::default()
    };
    let running = tidegate::server::start_with(&config, options)
        .await
        .map_err(|e| e.to_string())?;
    let ctl = format!(
        "{} ctl --admin {} --token-file {}",
        std::env::current_exe().map_or_else(|_| "tidegate".into(), |p| p.display().to_string()),
        running.admin_addr().map_or_else(
            || tidegate::config::DEFAULT_ADMIN.to_string(),
            |a| a.to_string()
        ),
        token.0.display()
    );
    let on_demand_note = if on_demand {
        format!(
            "\n  on demand: every image is stopped now. The first session launches image-1 (a\n  \
             child process of this demo); each image takes {ON_DEMAND_SESSIONS} sessions, so a third browser (or\n  \
             curl without cookies) launches image-2. An image whose sessions have all expired\n  \
             ({ON_DEMAND_SESSION_IDLE} s without a click) is stopped {ON_DEMAND_IDLE_STOP} s later. Watch the log and the status page.\n"
        )
    } else {
        String::new()
    };
    println!(
        "\ntidegate demo: three Seaside-like images behind http://{listen}/app\n{on_demand_note}\
         \n  open it in a browser and click 'increment': every click stays on the same image.\n\
         \n  or with curl (the session key travels in the links, as in Seaside 3):\n\
         \n    curl -s http://{listen}/app | grep -o 'href=\"[^\"]*\"'\n\
         \n    curl -s 'http://{listen}/app?_s=KEY&_k=x' | grep -E 'image|counter'\n\
         {}{}\nCtrl-C stops it.\n",
        if running.tls_addrs().is_empty() {
            String::new()
        } else {
            format!(
                "\n  over HTTPS (development CA in certs/):\n\
                 \n    curl --cacert certs/ca.pem -s https://localhost:{}/app | grep -E 'image|counter'\n",
                running.tls_addrs()[0].port()
            )
        },
        running.admin_addr().map_or_else(String::new, |a| format!(
            "\n  live status page: http://{a}/status   metrics: http://{a}/metrics\n\
             \n  change the farm while it serves (every pinned session stays on its image):\n\
             \n    {ctl} pools\n\
             \n    {ctl} drain demo image-2\n"
        ))
    );
    running.run_until(shutdown_signal()).await;
    drop(images);
    drop(token);
    Ok(())
}

/// The demo's admin token, in a file only its user reads, removed when the demo ends.
struct DemoToken(PathBuf);

impl DemoToken {
    fn write() -> Result<DemoToken, String> {
        use std::io::Write;
        // A name nobody can guess in advance, and a file that must be new: another user of
        // the machine cannot have put one (or a link) there to read the token from.
        let path = std::env::temp_dir().join(format!(
            "tidegate-demo-{}-{}.token",
            std::process::id(),
            tidegate::demo::random_key(12)
        ));
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&path).map_err(|e| {
            format!(
                "cannot write the demo's admin token to {}: {e}",
                path.display()
            )
        })?;
        writeln!(file, "{}", tidegate::demo::random_key(32))
            .map_err(|e| format!("cannot write the demo's admin token: {e}"))?;
        Ok(DemoToken(path))
    }
}

impl Drop for DemoToken {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
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
        _ = ctrl_c => {}
        _ = term => {}
    }
}

/// A port nothing listens on now, for a demo image launched later (picked by binding port 0
/// and letting it go).
fn free_port() -> std::io::Result<SocketAddr> {
    std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()
}
