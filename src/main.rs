//! The `tidegate` command: parse the flags, load and validate the config, run.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use tidegate::config::{AffinityMode, BackendFile, Config, FileConfig, PolicyName, PoolFile};
use tidegate::demo::{Image, ImageOptions};
use tidegate::error::ConfigError;

/// A session-affinity load balancer for Seaside farms and other stateful HTTP apps.
#[derive(Parser, Debug)]
#[command(name = "tidegate", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Validate a configuration file without serving.
    Check {
        /// The configuration file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Run three Seaside-like demo images and the balancer in front of them.
    Demo {
        /// Where the balancer listens.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
    },
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Read the configuration from this TOML file.
    #[arg(long, conflicts_with_all = ["listen", "backend", "affinity", "session_cookie", "session_param", "policy"])]
    config: Option<PathBuf>,
    /// Listen on this address (repeatable).
    #[arg(long)]
    listen: Vec<SocketAddr>,
    /// A backend, `ADDR` or `NAME=ADDR` (repeatable).
    #[arg(long)]
    backend: Vec<String>,
    /// How clients stay on their backend.
    #[arg(long, value_enum)]
    affinity: Option<AffinityMode>,
    /// How new sessions are spread.
    #[arg(long, value_enum)]
    policy: Option<PolicyName>,
    /// A cookie carrying the session id (repeatable; default `_s`).
    #[arg(long = "session-cookie")]
    session_cookie: Vec<String>,
    /// The query and form field carrying the session id (default `_s`).
    #[arg(long = "session-param")]
    session_param: Option<String>,
}

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
            backends.push(BackendFile {
                address,
                name,
                weight: 1,
            });
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
        let file = FileConfig {
            listen: self.listen.clone(),
            pools: vec![pool],
            ..FileConfig::default()
        };
        file.validate().map_err(|inv| {
            let flag = match inv.key.rsplit('.').next().unwrap_or("") {
                k if k.starts_with("backend") || k == "name" => "--backend",
                k if k.starts_with("cookies") => "--session-cookie",
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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match cli.command {
        Some(Command::Check { config }) => match Config::from_file(&config) {
            Ok(c) => {
                let backends: usize = c.pools.iter().map(|p| p.backends.len()).sum();
                println!(
                    "{}: ok ({} pools, {backends} backends, {} listeners)",
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
        Some(Command::Demo { listen }) => run(async move { demo(listen).await }),
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
            match config {
                Ok(config) => run(async move { serve(config).await }),
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::from(2)
                }
            }
        }
    }
}

fn run(main: impl std::future::Future<Output = Result<(), String>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tidegate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(main) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tidegate: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> Result<(), String> {
    let running = tidegate::server::start(&config)
        .await
        .map_err(|e| e.to_string())?;
    running.run_until(shutdown_signal()).await;
    Ok(())
}

async fn demo(listen: SocketAddr) -> Result<(), String> {
    let mut images = Vec::new();
    for name in ["image-1", "image-2", "image-3"] {
        let image = Image::start(
            "127.0.0.1:0".parse().expect("address"),
            ImageOptions::new(name),
        )
        .await
        .map_err(|e| format!("cannot start demo image {name}: {e}"))?;
        images.push(image);
    }
    let secret = tidegate::demo::random_key(32);
    let text = format!(
        "listen = [\"{listen}\"]\n[[pool]]\nname = \"demo\"\n\
         [pool.affinity_cookie]\nsecret = \"{secret}\"\n{}",
        images
            .iter()
            .map(|i| format!(
                "[[pool.backend]]\nname = \"{}\"\naddress = \"{}\"\n",
                i.name(),
                i.addr
            ))
            .collect::<String>()
    );
    let config = Config::from_toml(&text, "demo").map_err(|e| e.to_string())?;
    let running = tidegate::server::start(&config)
        .await
        .map_err(|e| e.to_string())?;
    println!(
        "\ntidegate demo: three Seaside-like images behind http://{listen}/app\n\
         \n  open it in a browser and click 'increment': every click stays on the same image.\n\
         \n  or with curl (the session key travels in the links, as in Seaside 3):\n\
         \n    curl -s http://{listen}/app | grep -o 'href=\"[^\"]*\"'\n\
         \n    curl -s 'http://{listen}/app?_s=KEY&_k=x' | grep -E 'image|counter'\n\
         \nCtrl-C stops it.\n"
    );
    running.run_until(shutdown_signal()).await;
    drop(images);
    Ok(())
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
