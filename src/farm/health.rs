//! Health at the edge: the prober that runs each pool's active checks (TCP connect or HTTP
//! GET) and, for pools without one, probes the backends that traffic took down until they
//! rise again; and the one place where a change of health is logged and counted.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::core::backend::{Backend, BackendId};
use crate::core::health::{Check, Health, HealthPolicy, Transition};
use crate::core::pool::Pool;
use crate::core::registry::Registry;
use crate::shutdown::Signal;

/// Logs and counts a change of health, if `transition` is one (on the request path, nearly
/// never: the check is inlined, the logging is not).
#[inline]
pub fn note(pool: &Pool, backend: &Backend, transition: Option<Transition>, reason: &str) {
    if let Some(t) = transition {
        changed(pool, backend, t, reason);
    }
}

#[cold]
fn changed(pool: &Pool, backend: &Backend, t: Transition, reason: &str) {
    match t.to {
        Health::Down => {
            backend.stats.went_down.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                pool = %pool.name,
                backend = %backend.name,
                address = %backend.address,
                reason,
                "backend down: no new sessions; its sessions follow on_pinned_down = {}",
                pool.on_pinned_down.as_str()
            );
        }
        // The first sign of life of a backend nothing was known of is no news.
        Health::Up if t.from == Health::Unknown => tracing::debug!(
            pool = %pool.name,
            backend = %backend.name,
            reason,
            "backend up (first seen)"
        ),
        Health::Up => {
            backend.stats.came_up.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                pool = %pool.name,
                backend = %backend.name,
                address = %backend.address,
                was = t.from.as_str(),
                reason,
                "backend up"
            );
        }
        Health::Unknown => {}
    }
}

/// How often the prober looks for checks that are due.
const TICK: Duration = Duration::from_millis(250);

/// Runs every pool's checks until `stop` fires. Each backend is checked every `interval`
/// of its pool, never twice at once; backends that leave the farm are forgotten.
pub async fn probe(registry: Arc<Registry>, mut stop: Signal) {
    struct Due {
        next: Instant,
        running: Arc<AtomicBool>,
    }
    let mut due: HashMap<(Box<str>, BackendId), Due> = HashMap::new();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait() => return,
        }
        let now = Instant::now();
        let topology = registry.topology();
        let mut seen = HashSet::new();
        for pool in topology.pools.iter() {
            for backend in pool.backends().all() {
                let key = (pool.name.clone(), backend.id);
                seen.insert(key.clone());
                // An image that is not running has nothing to check: its launch says when
                // its port accepts.
                if !pool.health.probes(backend.health.get()) || !backend.is_running() {
                    due.remove(&key);
                    continue;
                }
                let entry = due.entry(key).or_insert_with(|| Due {
                    // A passive pool waits an interval before probing a backend traffic
                    // just took down; an active one checks a newcomer at once.
                    next: if pool.health.check == Check::Passive {
                        now + pool.health.interval
                    } else {
                        now
                    },
                    running: Arc::default(),
                });
                if entry.next > now || entry.running.swap(true, Ordering::Relaxed) {
                    continue;
                }
                entry.next = now + pool.health.interval;
                tokio::spawn(check_one(
                    pool.clone(),
                    backend.clone(),
                    entry.running.clone(),
                ));
            }
        }
        due.retain(|k, _| seen.contains(k));
    }
}

async fn check_one(pool: Arc<Pool>, backend: Arc<Backend>, running: Arc<AtomicBool>) {
    let outcome = check(&pool.health, backend.address).await;
    backend.stats.checks.fetch_add(1, Ordering::Relaxed);
    let thresholds = pool.health.thresholds;
    let transition = match &outcome {
        Ok(()) => backend.health.check_passed(thresholds),
        Err(why) => {
            backend.stats.check_failures.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(pool = %pool.name, backend = %backend.name, "health check failed: {why}");
            backend.health.check_failed(thresholds)
        }
    };
    let reason = match &outcome {
        Ok(()) => format!("{} check passed", check_label(&pool.health.check)),
        Err(why) => format!("{} check failed: {why}", check_label(&pool.health.check)),
    };
    note(&pool, &backend, transition, &reason);
    running.store(false, Ordering::Relaxed);
}

fn check_label(check: &Check) -> &'static str {
    match check {
        Check::Http { .. } => "HTTP",
        Check::Tcp | Check::Passive => "TCP",
    }
}

/// One check of the backend at `addr`, within the policy's timeout.
pub async fn check(policy: &HealthPolicy, addr: SocketAddr) -> Result<(), String> {
    let attempt = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let Check::Http {
            path,
            expect_status,
        } = &policy.check
        else {
            return Ok(());
        };
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: tidegate-health-check\r\n\
             Connection: close\r\n\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut head = [0u8; 1024];
        let mut read = 0;
        while read < 12 {
            match stream.read(&mut head[read..]).await {
                Ok(0) => return Err("closed before a status line".to_string()),
                Ok(n) => read += n,
                Err(e) => return Err(format!("read: {e}")),
            }
        }
        // `HTTP/1.x NNN`: the status is all a check reads of the reply.
        let status = Some(&head[..12])
            .filter(|line| line.starts_with(b"HTTP/1.") && line[8] == b' ')
            .and_then(|line| std::str::from_utf8(&line[9..12]).ok())
            .and_then(|code| code.parse::<u16>().ok())
            .ok_or_else(|| "not an HTTP/1 reply".to_string())?;
        // The rest of the reply (bounded) is read before closing, so the backend sees an
        // orderly close rather than a reset.
        let mut left = 64 * 1024;
        while left > 0 {
            match stream.read(&mut head).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left -= n.min(left),
            }
        }
        if policy.check.passes(status) {
            Ok(())
        } else {
            Err(match expect_status {
                Some(s) => format!("status {status}, expected {s}"),
                None => format!("status {status}, expected 2xx or 3xx"),
            })
        }
    };
    match tokio::time::timeout(policy.timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(format!("no answer within {:?}", policy.timeout)),
    }
}
