//! Route matching: which pool serves a request, by Host and path prefix.

/// How a route matches the request's host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostMatch {
    /// Any host.
    Any,
    /// Exactly this host (lowercase, no port).
    Exact(Box<str>),
    /// Any subdomain of this suffix: `*.example.com` is stored as `.example.com`.
    Suffix(Box<str>),
}

impl HostMatch {
    /// Parses `example.com`, `*.example.com` or `*`.
    pub fn parse(pattern: &str) -> Self {
        let p = pattern.trim().to_ascii_lowercase();
        if p == "*" || p.is_empty() {
            HostMatch::Any
        } else if let Some(rest) = p.strip_prefix('*') {
            HostMatch::Suffix(rest.into())
        } else {
            HostMatch::Exact(p.into())
        }
    }

    fn matches(&self, host: &str) -> bool {
        match self {
            HostMatch::Any => true,
            HostMatch::Exact(h) => host.eq_ignore_ascii_case(h),
            HostMatch::Suffix(s) => {
                host.len() > s.len()
                    && host.is_char_boundary(host.len() - s.len())
                    && host[host.len() - s.len()..].eq_ignore_ascii_case(s)
            }
        }
    }

    fn len(&self) -> usize {
        match self {
            HostMatch::Any => 0,
            HostMatch::Exact(h) | HostMatch::Suffix(h) => h.len(),
        }
    }

    fn rank(&self) -> u8 {
        match self {
            HostMatch::Exact(_) => 2,
            HostMatch::Suffix(_) => 1,
            HostMatch::Any => 0,
        }
    }
}

/// One route: a host pattern and a path prefix leading to a pool (the pool itself, not a
/// position in a list, so a router and its pools are always swapped together).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route<P> {
    /// Host pattern.
    pub host: HostMatch,
    /// Path prefix (`/` matches everything).
    pub path_prefix: Box<str>,
    /// Where it leads.
    pub pool: P,
}

/// All routes, most specific first: exact host before wildcard before any, then the longest
/// path prefix. The first match wins.
#[derive(Clone, Debug)]
pub struct Router<P> {
    routes: Box<[Route<P>]>,
}

impl<P> Router<P> {
    /// Orders the routes by specificity.
    pub fn new(mut routes: Vec<Route<P>>) -> Self {
        // Within a rank, the longer pattern is the more specific (`*.shop.example.com`
        // before `*.example.com`).
        routes.sort_by(|a, b| {
            b.host
                .rank()
                .cmp(&a.host.rank())
                .then(b.host.len().cmp(&a.host.len()))
                .then(b.path_prefix.len().cmp(&a.path_prefix.len()))
        });
        Router {
            routes: routes.into_boxed_slice(),
        }
    }

    /// The pool for a request to `host` (a Host header or URI authority, port allowed) and
    /// `path`.
    #[inline]
    pub fn select(&self, host: Option<&str>, path: &str) -> Option<&P> {
        let host = host.map(strip_port).unwrap_or("");
        self.routes
            .iter()
            .find(|r| r.host.matches(host) && path_has_prefix(path, &r.path_prefix))
            .map(|r| &r.pool)
    }
}

/// `example.com:8080` → `example.com`; `[::1]:80` → `[::1]`.
pub fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.find(']').map_or(host, |end| &host[..=end]);
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

/// A prefix matches at a segment boundary: `/shop` matches `/shop` and `/shop/cart`, not
/// `/shopping`.
fn path_has_prefix(path: &str, prefix: &str) -> bool {
    if prefix == "/" || prefix.is_empty() {
        return true;
    }
    let prefix = prefix.strip_suffix('/').unwrap_or(prefix);
    path.starts_with(prefix)
        && matches!(
            path.as_bytes().get(prefix.len()),
            None | Some(b'/' | b'?' | b';')
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(host: &str, prefix: &str, pool: usize) -> Route<usize> {
        Route {
            host: HostMatch::parse(host),
            path_prefix: prefix.into(),
            pool,
        }
    }

    #[test]
    fn most_specific_route_wins() {
        let r = Router::new(vec![
            route("*", "/", 0),
            route("*.example.com", "/", 1),
            route("shop.example.com", "/", 2),
            route("shop.example.com", "/admin", 3),
            route("*", "/static", 4),
            route("*.eu.example.com", "/", 5),
        ]);
        assert_eq!(
            r.select(Some("a.eu.example.com"), "/").copied(),
            Some(5),
            "longer wildcard wins"
        );
        assert_eq!(r.select(Some("shop.example.com:443"), "/admin/x"), Some(&3));
        assert_eq!(r.select(Some("SHOP.example.com"), "/cart"), Some(&2));
        assert_eq!(r.select(Some("blog.example.com"), "/"), Some(&1));
        assert_eq!(r.select(Some("other.org"), "/static/a.css"), Some(&4));
        assert_eq!(r.select(Some("other.org"), "/staticx"), Some(&0));
        assert_eq!(r.select(None, "/"), Some(&0));
        assert_eq!(
            r.select(Some("example.com"), "/").copied(),
            Some(0),
            "wildcard needs a subdomain"
        );
    }

    #[test]
    fn no_route_means_no_pool() {
        let r = Router::new(vec![route("a.test", "/", 0)]);
        assert_eq!(r.select(Some("b.test"), "/"), None);
    }

    #[test]
    fn ports_are_stripped_from_hosts() {
        assert_eq!(strip_port("a.test:8080"), "a.test");
        assert_eq!(strip_port("[::1]:8080"), "[::1]");
        assert_eq!(strip_port("a.test"), "a.test");
    }
}
