//! The hot path — extract the id, look it up, decide the backend — allocates nothing, and
//! the form peek holds one bounded buffer however the body is framed. Counted with a real
//! counting allocator, per thread.

mod support;

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use http_body_util::BodyExt;
use support::Trickle;

use tidegate::core::affinity::{PinKey, TableLimits};
use tidegate::core::affinity_cookie::AffinityCookie;
use tidegate::core::backend::Backend;
use tidegate::core::balance::Policy;
use tidegate::core::pool::{Affinity, Decision, Pool, RequestView, SessionAffinity};
use tidegate::core::session_id::{self, IdRules, IdSource, SessionNames};

fn pool(affinity: Affinity, policy: Policy) -> Pool {
    let backends = (1..=3)
        .map(|i| {
            Backend::new(
                &format!("image-{i}"),
                format!("127.0.0.1:900{i}").parse().unwrap(),
                1,
            )
        })
        .collect();
    Pool::new("app", policy, affinity, None, backends)
}

fn session() -> Affinity {
    Affinity::Session(Box::new(SessionAffinity::new(
        SessionNames::default(),
        IdRules::default(),
        TableLimits::default(),
        65536,
        32768,
    )))
}

const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3));

#[test]
fn extracting_looking_up_and_routing_a_pinned_session_allocates_nothing() {
    let p = pool(session(), Policy::RoundRobin);
    let table = p.table().unwrap();
    for i in 0..10_000 {
        table.pin(
            PinKey::of(&format!("K{i:015}")),
            p.backends().all()[i % 3].id,
            100,
        );
    }
    let queries: Vec<String> = (0..1000)
        .map(|i| format!("_k=abcdefgh&_s=K{i:015}"))
        .collect();
    let cookies: Vec<String> = (0..1000)
        .map(|i| format!("theme=dark; _s=K{i:015}; lang=en"))
        .collect();
    let Affinity::Session(s) = &p.affinity else {
        unreachable!()
    };
    let info = allocation_counter::measure(|| {
        for (q, c) in queries.iter().zip(&cookies) {
            let set = p.backends();
            let id = session_id::from_query(q, &s.names.param, &s.rules).unwrap();
            let from_cookie =
                session_id::from_cookie_header(c, &s.names.cookies, &s.rules).unwrap();
            assert_eq!(id, from_cookie);
            let view = RequestView {
                id: Some((id, IdSource::Query)),
                affinity_cookie: None,
                client: CLIENT,
            };
            let routing = p.route(&set, &view, 101, &[]).unwrap();
            assert_eq!(routing.decision, Decision::Pinned);
        }
    });
    assert_eq!(info.count_total, 0, "{info:?}");
}

#[test]
fn routing_new_sessions_allocates_nothing() {
    for policy in [Policy::RoundRobin, Policy::LeastSessions] {
        let p = pool(session(), policy);
        let info = allocation_counter::measure(|| {
            for _ in 0..1000 {
                let set = p.backends();
                let view = RequestView {
                    id: None,
                    affinity_cookie: None,
                    client: CLIENT,
                };
                assert_eq!(
                    p.route(&set, &view, 1, &[]).unwrap().decision,
                    Decision::New
                );
            }
        });
        assert_eq!(info.count_total, 0, "{policy:?}: {info:?}");
    }
}

#[test]
fn client_ip_routing_allocates_nothing() {
    let p = pool(Affinity::ClientIp, Policy::RoundRobin);
    let info = allocation_counter::measure(|| {
        for i in 0..1000u32 {
            let set = p.backends();
            let view = RequestView {
                id: None,
                affinity_cookie: None,
                client: IpAddr::V4(Ipv4Addr::from(i)),
            };
            assert_eq!(
                p.route(&set, &view, 1, &[]).unwrap().decision,
                Decision::Hashed
            );
        }
    });
    assert_eq!(info.count_total, 0, "{info:?}");
}

#[test]
fn routing_by_an_affinity_cookie_under_any_secret_allocates_nothing() {
    let backends = (1..=3)
        .map(|i| {
            Backend::new(
                &format!("image-{i}"),
                format!("127.0.0.1:900{i}").parse().unwrap(),
                1,
            )
        })
        .collect();
    let cookie = AffinityCookie::new("tg", b"new-secret-16-bytes", "/")
        .also_verifying(&[b"old-secret-16-bytes", b"older-secret-16-byt"]);
    let p = Pool::new("app", Policy::RoundRobin, session(), Some(cookie), backends);
    let set = p.backends();
    let image3 = set.all()[2].id;
    // The values a browser may hold for image-3: under the signing secret and the older ones.
    let held: Vec<String> = [
        &b"new-secret-16-bytes"[..],
        b"old-secret-16-bytes",
        b"older-secret-16-byt",
    ]
    .iter()
    .map(|s| AffinityCookie::new("tg", s, "/").value_for(image3))
    .collect();
    let info = allocation_counter::measure(|| {
        for i in 0..1000 {
            let set = p.backends();
            let view = RequestView {
                id: None,
                affinity_cookie: Some(&held[i % 3]),
                client: CLIENT,
            };
            let routing = p.route(&set, &view, 1, &[]).unwrap();
            assert_eq!(
                (routing.backend.id, routing.decision),
                (image3, Decision::Pinned)
            );
            assert_eq!(routing.insert_cookie.is_some(), i % 3 != 0);
        }
    });
    assert_eq!(info.count_total, 0, "{info:?}");
}

/// A 64 KiB form sent as one-byte frames used to cost the peek a frame each (megabytes for a
/// 64 KiB peek); it holds one buffer of at most its limit, replayed as the body it was.
#[test]
fn a_form_peek_of_one_byte_frames_holds_one_buffer_within_its_limit() {
    const LIMIT: usize = 64 * 1024;
    /// Bookkeeping beyond the buffer: the shared header of a `Bytes`, the trailers.
    const SLACK: usize = 1024;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let data: Vec<u8> = (0..LIMIT + 5000).map(|i| b'a' + (i % 26) as u8).collect();
    let data = Bytes::from(data);
    for (length, with_trailers) in [
        (LIMIT, false),
        (LIMIT, true),
        (LIMIT + 5000, true),
        (300, true),
    ] {
        let trailers = with_trailers.then(|| {
            let mut t = HeaderMap::new();
            t.insert("x-checksum", HeaderValue::from_static("1234"));
            t
        });
        let body = Trickle::new(data.slice(..length), trailers.clone());
        let mut peeked = None;
        let info = allocation_counter::measure(|| {
            let peek = rt.block_on(tidegate::upstream::peek(
                body,
                LIMIT,
                Duration::from_secs(5),
            ));
            peeked = Some(peek.expect("the peek reads the body"));
        });
        let case = format!("{length} bytes, trailers: {with_trailers}");
        assert!(
            info.bytes_current <= (LIMIT + SLACK) as i64,
            "{case}: the peek holds {} bytes: {info:?}",
            info.bytes_current
        );
        // Growing by doubling holds the old buffer and the new one for a moment.
        assert!(
            info.bytes_max <= (LIMIT + LIMIT / 2 + SLACK) as u64,
            "{case}: the peek held {} bytes at its peak: {info:?}",
            info.bytes_max
        );
        let peek = peeked.unwrap();
        assert_eq!(peek.head, data.slice(..length.min(LIMIT)), "{case}");
        assert_eq!(
            peek.complete,
            (length == LIMIT && !with_trailers) || length < LIMIT,
            "{case}"
        );
        let replayed = rt.block_on(peek.body.collect()).unwrap();
        assert_eq!(replayed.trailers(), trailers.as_ref(), "{case}");
        assert_eq!(replayed.to_bytes(), data.slice(..length), "{case}");
    }
}
