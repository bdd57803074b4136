//! Choosing a backend for a new session: weighted round-robin, least-sessions, and
//! rendezvous hashing of the client address for the table-free client-IP mode.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::core::backend::{Backend, BackendId, BackendSet, FIXED_SEED};

/// How a pool spreads new sessions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// Weighted round-robin over backends that take new sessions.
    RoundRobin,
    /// The backend with the fewest live pins per unit of weight, so a new backend fills up.
    LeastSessions,
}

impl Policy {
    /// A short stable label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::RoundRobin => "round-robin",
            Policy::LeastSessions => "least-sessions",
        }
    }
}

/// Whether a backend may get a new session: it takes them, and the caller's test passes
/// (not tried already for this request, room under `max_sessions`).
#[inline]
fn eligible(b: &Backend, open: &impl Fn(&Backend) -> bool) -> bool {
    b.takes_new_sessions() && open(b)
}

/// The next backend in weighted round-robin order that takes new sessions. One relaxed
/// `fetch_add`; ineligible backends (and those in `tried`) are skipped in order.
#[inline]
pub fn round_robin<'s>(
    set: &'s BackendSet,
    cursor: &AtomicUsize,
    open: impl Fn(&Backend) -> bool,
) -> Option<&'s Arc<Backend>> {
    let schedule = set.schedule();
    if schedule.is_empty() {
        return None;
    }
    let start = cursor.fetch_add(1, Ordering::Relaxed);
    (0..schedule.len())
        .map(|i| &set.all()[schedule[(start + i) % schedule.len()] as usize])
        .find(|b| eligible(b, &open))
}

/// The backend with the fewest pins per unit of weight among those taking new sessions;
/// ties go round-robin so equal backends share new sessions.
pub fn least_sessions<'s>(
    set: &'s BackendSet,
    cursor: &AtomicUsize,
    open: impl Fn(&Backend) -> bool,
    pins_of: impl Fn(BackendId) -> u64,
) -> Option<&'s Arc<Backend>> {
    let n = set.len();
    if n == 0 {
        return None;
    }
    let start = cursor.fetch_add(1, Ordering::Relaxed);
    let mut best: Option<(&Arc<Backend>, u128)> = None;
    for i in 0..n {
        let b = &set.all()[(start + i) % n];
        if !eligible(b, &open) {
            continue;
        }
        // Compare pins/weight without division: scale by the product of the other weights
        // would overflow, so compare a/w_a < b/w_b as a*w_b < b*w_a.
        let load = u128::from(pins_of(b.id));
        let better = match best {
            None => true,
            Some((cur, cur_load)) => {
                load * u128::from(cur.weight()) < cur_load * u128::from(b.weight())
            }
        };
        if better {
            best = Some((b, load));
        }
    }
    best.map(|(b, _)| b)
}

/// The backend for a client address by weighted rendezvous hashing: every backend scores the
/// address and the highest score wins. Adding one backend to n moves only the addresses the
/// newcomer now wins, about 1/(n+1) of them, all to the newcomer; removing one moves only its
/// own. The hash has a fixed seed, so every instance and restart agrees.
pub fn by_client_address(
    set: &BackendSet,
    addr: IpAddr,
    open: impl Fn(&Backend) -> bool,
) -> Option<&Arc<Backend>> {
    let mut key = [0u8; 20];
    let len = match addr {
        IpAddr::V4(v4) => {
            key[..4].copy_from_slice(&v4.octets());
            4
        }
        IpAddr::V6(v6) => {
            key[..16].copy_from_slice(&v6.octets());
            16
        }
    };
    let mut best: Option<(&Arc<Backend>, f64)> = None;
    for b in set.all() {
        if !eligible(b, &open) {
            continue;
        }
        key[len..len + 4].copy_from_slice(&b.id.0.to_le_bytes());
        let h = xxhash_rust::xxh3::xxh3_64_with_seed(&key[..len + 4], FIXED_SEED);
        // Map to (0, 1] and weight it: score = -w / ln(u) is the standard weighted
        // rendezvous score, monotone in u for equal weights.
        let u = ((h >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        let score = -f64::from(b.weight()) / u.ln();
        if best.is_none_or(|(_, s)| score > s) {
            best = Some((b, score));
        }
    }
    best.map(|(b, _)| b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::backend::AdminState;
    use proptest::prelude::*;
    use std::collections::HashMap;
    use std::net::Ipv4Addr;

    fn set(names: &[(&str, u32)]) -> BackendSet {
        BackendSet::new(
            names
                .iter()
                .enumerate()
                .map(|(i, (n, w))| {
                    Arc::new(Backend::new(
                        n,
                        format!("127.0.0.1:{}", 9000 + i).parse().unwrap(),
                        *w,
                    ))
                })
                .collect(),
            |_| None,
        )
    }

    #[test]
    fn round_robin_cycles_and_skips_ineligible() {
        let s = set(&[("a", 1), ("b", 1), ("c", 1)]);
        let cursor = AtomicUsize::new(0);
        let picks: Vec<_> = (0..6)
            .map(|_| round_robin(&s, &cursor, |_| true).unwrap().name.to_string())
            .collect();
        assert_eq!(picks, ["a", "b", "c", "a", "b", "c"]);
        s.all()[1].set_admin(AdminState::Draining);
        let picks: Vec<_> = (0..4)
            .map(|_| round_robin(&s, &cursor, |_| true).unwrap().name.to_string())
            .collect();
        assert!(!picks.contains(&"b".to_string()));
        let tried: Vec<BackendId> = vec![s.all()[0].id];
        assert!(
            (0..4).all(|_| round_robin(&s, &cursor, |b| !tried.contains(&b.id))
                .unwrap()
                .name
                .as_ref()
                == "c"),
            "a backend tried already is skipped"
        );
        for b in s.all() {
            b.set_admin(AdminState::Disabled);
        }
        assert!(round_robin(&s, &cursor, |_| true).is_none());
    }

    #[test]
    fn round_robin_honours_weights() {
        let s = set(&[("a", 3), ("b", 1)]);
        let cursor = AtomicUsize::new(0);
        let mut counts: HashMap<String, usize> = HashMap::new();
        for _ in 0..400 {
            *counts
                .entry(round_robin(&s, &cursor, |_| true).unwrap().name.to_string())
                .or_default() += 1;
        }
        assert_eq!(counts["a"], 300);
        assert_eq!(counts["b"], 100);
    }

    #[test]
    fn least_sessions_prefers_the_emptiest_per_weight() {
        let s = set(&[("a", 1), ("b", 1), ("c", 2)]);
        let cursor = AtomicUsize::new(0);
        let pins: HashMap<BackendId, u64> = [
            (BackendId::from_name("a"), 10),
            (BackendId::from_name("b"), 3),
            (BackendId::from_name("c"), 8),
        ]
        .into();
        let pick = least_sessions(&s, &cursor, |_| true, |id| pins[&id]).unwrap();
        assert_eq!(&*pick.name, "b");
        let pins: HashMap<BackendId, u64> = [
            (BackendId::from_name("a"), 10),
            (BackendId::from_name("b"), 5),
            (BackendId::from_name("c"), 8),
        ]
        .into();
        let pick = least_sessions(&s, &cursor, |_| true, |id| pins[&id]).unwrap();
        assert_eq!(
            &*pick.name, "c",
            "8 pins at weight 2 is lighter than 5 at weight 1"
        );
    }

    #[test]
    fn least_sessions_rotates_among_equals() {
        let s = set(&[("a", 1), ("b", 1)]);
        let cursor = AtomicUsize::new(0);
        let first = least_sessions(&s, &cursor, |_| true, |_| 0)
            .unwrap()
            .name
            .clone();
        let second = least_sessions(&s, &cursor, |_| true, |_| 0)
            .unwrap()
            .name
            .clone();
        assert_ne!(first, second);
    }

    fn client(i: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i * 7919))
    }

    #[test]
    fn client_address_choice_is_stable_and_spread() {
        let s = set(&[("a", 1), ("b", 1), ("c", 1), ("d", 1)]);
        let mut counts: HashMap<String, usize> = HashMap::new();
        for i in 0..20_000 {
            let first = by_client_address(&s, client(i), |_| true).unwrap();
            let again = by_client_address(&s, client(i), |_| true).unwrap();
            assert_eq!(first.id, again.id);
            *counts.entry(first.name.to_string()).or_default() += 1;
        }
        for (name, n) in counts {
            assert!((4_500..=5_500).contains(&n), "{name} got {n} of 20000");
        }
    }

    #[test]
    fn adding_a_backend_moves_about_one_in_n_plus_one_all_to_it() {
        let names = ["a", "b", "c", "d", "e"];
        for n in 2..names.len() {
            let before = set(&names[..n].iter().map(|&x| (x, 1)).collect::<Vec<_>>());
            let after = set(&names[..=n].iter().map(|&x| (x, 1)).collect::<Vec<_>>());
            let total = 20_000;
            let mut moved = 0;
            for i in 0..total {
                let was = by_client_address(&before, client(i), |_| true).unwrap();
                let now = by_client_address(&after, client(i), |_| true).unwrap();
                if was.id != now.id {
                    assert_eq!(
                        &*now.name, names[n],
                        "a moved client went to an old backend"
                    );
                    moved += 1;
                }
            }
            let expected = total as f64 / (n + 1) as f64;
            let ratio = moved as f64 / expected;
            assert!(
                (0.9..=1.1).contains(&ratio),
                "n={n}: moved {moved}, expected ~{expected}"
            );
        }
    }

    #[test]
    fn client_address_choice_skips_down_backends_and_moves_only_theirs() {
        let s = set(&[("a", 1), ("b", 1), ("c", 1)]);
        let before: Vec<_> = (0..3000)
            .map(|i| by_client_address(&s, client(i), |_| true).unwrap().id)
            .collect();
        for _ in 0..3 {
            s.all()[0]
                .health
                .refused(crate::core::health::Thresholds::default());
        }
        for (i, was) in before.iter().enumerate() {
            let now = by_client_address(&s, client(i as u32), |_| true)
                .unwrap()
                .id;
            assert_ne!(now, s.all()[0].id);
            if *was != s.all()[0].id {
                assert_eq!(now, *was, "a client of a healthy backend moved");
            }
        }
    }

    fn weighted(backends: &[(String, u32)]) -> BackendSet {
        let named: Vec<_> = backends.iter().map(|(n, w)| (n.as_str(), *w)).collect();
        set(&named)
    }

    /// 1 to 6 backends of distinct names, weights 1 to `max_weight`.
    fn backends(max_weight: u32) -> impl Strategy<Value = Vec<(String, u32)>> {
        proptest::collection::btree_set("[a-z][a-z0-9]{0,7}", 1..7).prop_flat_map(move |names| {
            let n = names.len();
            (
                Just(names.into_iter().collect::<Vec<_>>()),
                proptest::collection::vec(1..=max_weight, n),
            )
                .prop_map(|(names, weights)| names.into_iter().zip(weights).collect())
        })
    }

    fn gcd(a: u32, b: u32) -> u32 {
        if b == 0 { a } else { gcd(b, a % b) }
    }

    /// Picks per backend name of `client(0..clients)`.
    fn spread(s: &BackendSet, clients: u32) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for i in 0..clients {
            let b = by_client_address(s, client(i), |_| true).unwrap();
            *counts.entry(b.name.to_string()).or_default() += 1;
        }
        counts
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Every run of one schedule's length, wherever it starts, gives each backend
        /// exactly its share of the weights.
        #[test]
        fn round_robin_gives_each_backend_its_weight(
            list in backends(8),
            start in 0usize..1000,
        ) {
            let s = weighted(&list);
            let divisor = list.iter().map(|(_, w)| *w).fold(0, gcd);
            let cycle: u32 = list.iter().map(|(_, w)| w / divisor).sum();
            let cursor = AtomicUsize::new(start);
            let mut counts: HashMap<String, u32> = HashMap::new();
            for _ in 0..cycle * 3 {
                let b = round_robin(&s, &cursor, |_| true).unwrap();
                *counts.entry(b.name.to_string()).or_default() += 1;
            }
            for (name, w) in &list {
                prop_assert_eq!(counts.get(name).copied().unwrap_or(0), 3 * w / divisor, "{}", name);
            }
        }

        /// Backends that take no new sessions get none; the others still all do.
        #[test]
        fn round_robin_never_picks_a_backend_closed_to_new_sessions(
            list in backends(4),
            closed in proptest::collection::vec(any::<bool>(), 6),
        ) {
            let s = weighted(&list);
            for (b, &c) in s.all().iter().zip(&closed) {
                if c {
                    b.set_admin(AdminState::Draining);
                }
            }
            let open: Vec<_> = s.all().iter().filter(|b| b.takes_new_sessions()).map(|b| b.id).collect();
            let cursor = AtomicUsize::new(0);
            let total: u32 = list.iter().map(|(_, w)| *w).sum();
            let mut seen = std::collections::HashSet::new();
            for _ in 0..total * 2 {
                match round_robin(&s, &cursor, |_| true) {
                    Some(b) => {
                        prop_assert!(open.contains(&b.id), "{} is closed", b.name);
                        seen.insert(b.id);
                    }
                    None => prop_assert!(open.is_empty()),
                }
            }
            prop_assert_eq!(seen.len(), open.len());
        }

        /// The pick has the fewest pins per unit of weight of all eligible backends.
        #[test]
        fn least_sessions_picks_a_lightest_backend(
            list in backends(8),
            pins in proptest::collection::vec(0u64..1000, 6),
            start in 0usize..10,
        ) {
            let s = weighted(&list);
            let load: HashMap<BackendId, u64> = s.all().iter().zip(&pins).map(|(b, p)| (b.id, *p)).collect();
            let cursor = AtomicUsize::new(start);
            let pick = least_sessions(&s, &cursor, |_| true, |id| load[&id]).unwrap();
            for b in s.all() {
                prop_assert!(
                    u128::from(load[&pick.id]) * u128::from(b.weight())
                        <= u128::from(load[&b.id]) * u128::from(pick.weight()),
                    "{} ({} pins, weight {}) was lighter than the pick {} ({} pins, weight {})",
                    b.name, load[&b.id], b.weight(), pick.name, load[&pick.id], pick.weight()
                );
            }
        }

        /// Client addresses spread over the backends in proportion to their weights.
        #[test]
        fn client_addresses_spread_by_weight(list in backends(4)) {
            let s = weighted(&list);
            let clients = 8_000;
            let counts = spread(&s, clients);
            let total: u32 = list.iter().map(|(_, w)| *w).sum();
            for (name, w) in &list {
                let expected = f64::from(clients) * f64::from(*w) / f64::from(total);
                let got = counts.get(name).copied().unwrap_or(0) as f64;
                prop_assert!(
                    (got - expected).abs() <= expected * 0.25 + 20.0,
                    "{} got {} of {} clients, expected about {:.0}", name, got, clients, expected
                );
            }
        }

        /// A backend added takes only clients for itself; one removed gives away only its own;
        /// one whose weight grows only gains clients, and one whose weight shrinks only
        /// loses them. Every other client stays where it was.
        #[test]
        fn client_addresses_move_only_with_the_backend_that_changed(
            list in backends(4),
            newcomer in "[A-Z][a-z]{0,7}",
            which in any::<prop::sample::Index>(),
            new_weight in 1u32..=8,
        ) {
            let clients = 3_000;
            let before = weighted(&list);
            let was: Vec<BackendId> = (0..clients)
                .map(|i| by_client_address(&before, client(i), |_| true).unwrap().id)
                .collect();
            let changed = which.index(list.len());
            let changed_id = BackendId::from_name(&list[changed].0);
            let mut grown = list.clone();
            grown.push((newcomer.clone(), 1));
            let mut shrunk = list.clone();
            shrunk.remove(changed);
            let mut reweighted = list.clone();
            reweighted[changed].1 = new_weight;
            let old_weight = list[changed].1;
            let newcomer_id = BackendId::from_name(&newcomer);
            for (after, label) in [(grown, "added"), (shrunk, "removed"), (reweighted, "reweighted")] {
                let after = weighted(&after);
                for (i, &was) in was.iter().enumerate() {
                    let Some(now) = by_client_address(&after, client(i as u32), |_| true) else {
                        prop_assert_eq!(label, "removed");
                        prop_assert_eq!(list.len(), 1);
                        continue;
                    };
                    let now = now.id;
                    if now == was {
                        continue;
                    }
                    let allowed = match label {
                        "added" => now == newcomer_id,
                        "removed" => was == changed_id,
                        _ if new_weight > old_weight => now == changed_id,
                        _ => was == changed_id,
                    };
                    prop_assert!(allowed, "{}: client {} moved from {} to {}", label, i, was, now);
                }
            }
        }
    }
}
