//! TLS termination with rustls: certificates loaded and checked, chosen by SNI (exact, then
//! wildcard, else the first), swapped whole on reload so no connection is dropped.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, ServerSessionMemoryCache};
use rustls::sign::CertifiedKey;
use rustls::{CipherSuite, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Where one certificate chain and its key live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 RSA or SEC1).
    pub key: PathBuf,
}

/// Why a certificate could not be loaded; always names the file.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// The file could not be read.
    #[error("{path}: cannot read: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file holds no usable PEM of the expected kind.
    #[error("{path}: {reason}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The key does not belong to the certificate, or cannot sign.
    #[error("{key}: does not match the certificate {cert}: {reason}")]
    Mismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// Detail from rustls.
        reason: String,
    },
}

/// One loaded certificate: its key for rustls and what it is valid for.
#[derive(Debug)]
pub struct LoadedCert {
    /// The files it came from.
    pub files: CertFiles,
    /// Lowercase DNS names from the subject alternative names (`*.x.y` kept as written).
    pub names: Vec<String>,
    /// Unix seconds after which it has expired.
    pub not_after: i64,
    /// `not_after` in RFC 2822 form, for messages.
    pub not_after_text: String,
    key: Arc<CertifiedKey>,
}

impl LoadedCert {
    /// Whether it expired before `now` (unix seconds).
    pub fn expired(&self, now: i64) -> bool {
        self.not_after < now
    }
}

/// Every certificate of the listeners, indexed for SNI; the first is the default.
#[derive(Debug)]
pub struct CertStore {
    certs: Vec<LoadedCert>,
    exact: HashMap<String, usize>,
    wildcard: HashMap<String, usize>,
}

impl CertStore {
    /// Loads and checks every certificate; the first error stops the load.
    pub fn load(files: &[CertFiles], provider: &CryptoProvider) -> Result<CertStore, CertError> {
        let mut certs = Vec::with_capacity(files.len());
        for f in files {
            certs.push(load_one(f, provider)?);
        }
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        for (i, c) in certs.iter().enumerate() {
            for name in &c.names {
                // The first certificate naming a host wins, as in configuration order.
                match name.strip_prefix("*.") {
                    Some(parent) => wildcard.entry(parent.to_string()).or_insert(i),
                    None => exact.entry(name.clone()).or_insert(i),
                };
            }
        }
        Ok(CertStore {
            certs,
            exact,
            wildcard,
        })
    }

    /// The certificates, in configuration order.
    pub fn certs(&self) -> &[LoadedCert] {
        &self.certs
    }

    /// The certificate for a server name: exact name, then a wildcard one label up, then
    /// the default.
    pub fn choose(&self, server_name: Option<&str>) -> Option<&LoadedCert> {
        let chosen = server_name.and_then(|name| {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            self.exact.get(&name).copied().or_else(|| {
                let (_, parent) = name.split_once('.')?;
                self.wildcard.get(parent).copied()
            })
        });
        self.certs.get(chosen.unwrap_or(0))
    }
}

fn load_one(files: &CertFiles, provider: &CryptoProvider) -> Result<LoadedCert, CertError> {
    let cert_pem = std::fs::read(&files.cert).map_err(|source| CertError::Read {
        path: files.cert.clone(),
        source,
    })?;
    let key_pem = std::fs::read(&files.key).map_err(|source| CertError::Read {
        path: files.key.clone(),
        source,
    })?;
    let pem_error = |path: &Path, reason: String| CertError::Pem {
        path: path.to_path_buf(),
        reason,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| {
            pem_error(
                &files.cert,
                format!("not a valid PEM certificate chain: {e}"),
            )
        })?;
    if chain.is_empty() {
        return Err(pem_error(&files.cert, "no CERTIFICATE block found".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        pem_error(
            &files.key,
            format!("no usable private key (PKCS#8, RSA or SEC1): {e}"),
        )
    })?;
    let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).map_err(|e| {
        pem_error(
            &files.cert,
            format!("the first certificate cannot be parsed: {e}"),
        )
    })?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = leaf.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                x509_parser::extensions::GeneralName::DNSName(d) => {
                    names.push(d.to_ascii_lowercase())
                }
                x509_parser::extensions::GeneralName::IPAddress(ip) => {
                    let ip = match ip.len() {
                        4 => <[u8; 4]>::try_from(*ip)
                            .ok()
                            .map(|b| std::net::IpAddr::from(b).to_string()),
                        16 => <[u8; 16]>::try_from(*ip)
                            .ok()
                            .map(|b| std::net::IpAddr::from(b).to_string()),
                        _ => None,
                    };
                    names.extend(ip);
                }
                _ => {}
            }
        }
    }
    let not_after = leaf.validity().not_after;
    let not_after_text = not_after.to_string();
    let not_after = not_after.timestamp();
    let key = CertifiedKey::from_der(chain, key, provider).map_err(|e| CertError::Mismatch {
        cert: files.cert.clone(),
        key: files.key.clone(),
        reason: e.to_string(),
    })?;
    Ok(LoadedCert {
        files: files.clone(),
        names,
        not_after,
        not_after_text,
        key: Arc::new(key),
    })
}

/// Chooses the certificate for each handshake from the current store.
#[derive(Debug)]
pub struct CertResolver {
    store: ArcSwap<CertStore>,
}

impl CertResolver {
    /// A resolver over `store`.
    pub fn new(store: CertStore) -> Self {
        CertResolver {
            store: ArcSwap::from_pointee(store),
        }
    }

    /// The store in use.
    pub fn store(&self) -> Arc<CertStore> {
        self.store.load_full()
    }

    /// Swaps in a new store: handshakes from now on use it; open connections are untouched.
    pub fn replace(&self, store: CertStore) {
        self.store.store(Arc::new(store));
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.store
            .load()
            .choose(hello.server_name())
            .map(|c| c.key.clone())
    }
}

/// The lowest TLS version a listener accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
pub enum MinVersion {
    /// TLS 1.2 and 1.3.
    #[serde(rename = "1.2")]
    Tls12,
    /// TLS 1.3 only.
    #[serde(rename = "1.3")]
    Tls13,
}

/// The crypto provider tidegate uses: aws-lc-rs, installed as the process default once.
pub fn provider() -> Arc<CryptoProvider> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
}

/// The provider with the server's suite preference: AES-128-GCM first. Its SHA-256 key
/// schedule runs on the SHA extensions of current x86 and ARM cores, where SHA-384 has no
/// such help: a full handshake costs measurably less, at a security margin no practical
/// attack approaches. AES-256-GCM and ChaCha20-Poly1305 stay for clients that offer only those.
fn server_provider() -> CryptoProvider {
    let mut provider = (*provider()).clone();
    provider
        .cipher_suites
        .sort_by_key(|suite| match suite.suite() {
            CipherSuite::TLS13_AES_128_GCM_SHA256
            | CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
            | CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => 0,
            CipherSuite::TLS13_AES_256_GCM_SHA384
            | CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
            | CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => 1,
            _ => 2,
        });
    provider
}

/// The rustls server configuration: ALPN h2 and http/1.1, session resumption by tickets and
/// a server-side cache, certificates from `resolver`.
pub fn server_config(
    resolver: Arc<CertResolver>,
    min: MinVersion,
) -> Result<Arc<ServerConfig>, rustls::Error> {
    let versions: &[&rustls::SupportedProtocolVersion] = match min {
        MinVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        MinVersion::Tls13 => &[&rustls::version::TLS13],
    };
    let mut config = ServerConfig::builder_with_provider(Arc::new(server_provider()))
        .with_protocol_versions(versions)?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config.ignore_client_order = true;
    config.session_storage = ServerSessionMemoryCache::new(20_000);
    config.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()?;
    Ok(Arc::new(config))
}

/// Logs a warning for every expired certificate (still served: operators sometimes must).
pub fn warn_expired(store: &CertStore) {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    for c in store.certs() {
        if c.expired(now) {
            tracing::warn!(
                cert = %c.files.cert.display(),
                expired = %c.not_after_text,
                "certificate has expired; serving it anyway"
            );
        }
    }
}

/// Warns of every private key file other users of the machine may read (it would let them
/// impersonate the site).
pub fn warn_readable_keys(files: &[CertFiles]) {
    #[cfg(unix)]
    for f in files {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(&f.key)
            && meta.permissions().mode() & 0o004 != 0
        {
            tracing::warn!(
                key = %f.key.display(),
                mode = format!("{:o}", meta.permissions().mode() & 0o777),
                "private key file is readable by other users of this machine: chmod o-r it (600, or 640 with a group of its own)"
            );
        }
    }
    #[cfg(not(unix))]
    let _ = files;
}

/// The modification times of every file of `files`, to notice changes.
pub fn stamps(files: &[CertFiles]) -> Vec<Option<SystemTime>> {
    files
        .iter()
        .flat_map(|f| [&f.cert, &f.key])
        .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .collect()
}

/// Reloads the certificates in use: on SIGHUP and `POST /api/reload` (through the farm's
/// reload, which may bring other files), and when a file changes. A file that fails to load
/// is an error naming it, and the certificates in use keep serving.
pub struct Reloader {
    resolver: Arc<CertResolver>,
    /// The files, and their times when they were last read.
    files: std::sync::Mutex<(Vec<CertFiles>, Vec<Option<SystemTime>>)>,
}

impl Reloader {
    /// A reloader for `resolver`, whose certificates came from `files` as they were at
    /// `stamps` (taken before they were read, so a change from then on is seen).
    pub fn new(
        resolver: Arc<CertResolver>,
        files: Vec<CertFiles>,
        stamps: Vec<Option<SystemTime>>,
    ) -> Self {
        Reloader {
            resolver,
            files: std::sync::Mutex::new((files, stamps)),
        }
    }

    fn files(&self) -> std::sync::MutexGuard<'_, (Vec<CertFiles>, Vec<Option<SystemTime>>)> {
        self.files.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Loads the certificates again (from `files` when given: a reload may name others).
    pub async fn reload(&self, reason: &str, files: Option<Vec<CertFiles>>) -> Result<(), String> {
        let files = files.unwrap_or_else(|| self.files().0.clone());
        let stamps = stamps(&files);
        let loaded = {
            let files = files.clone();
            tokio::task::spawn_blocking(move || CertStore::load(&files, &provider())).await
        };
        match loaded {
            Ok(Ok(store)) => {
                warn_expired(&store);
                warn_readable_keys(&files);
                self.resolver.replace(store);
                *self.files() = (files, stamps);
                tracing::info!(reason, "certificates reloaded");
                Ok(())
            }
            Ok(Err(e)) => {
                tracing::error!(
                    reason,
                    "certificate reload failed, the previous certificates keep serving: {e}"
                );
                Err(e.to_string())
            }
            Err(e) => Err(format!("certificate reload task failed: {e}")),
        }
    }

    /// Checks the files every `every` and reloads when one changed, until `stop` fires.
    pub async fn watch(
        self: Arc<Self>,
        every: std::time::Duration,
        mut stop: crate::shutdown::Signal,
    ) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.wait() => return,
            }
            let changed = {
                let guard = self.files();
                stamps(&guard.0) != guard.1
            };
            if changed {
                let _ = self.reload("a certificate file changed", None).await;
            }
        }
    }
}
