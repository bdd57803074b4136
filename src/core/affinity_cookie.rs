//! The inserted affinity cookie: an opaque, HMAC-signed token naming a backend.
//!
//! The value is the backend's stable id and a truncated HMAC-SHA256 of it under the operator's
//! secret: it reveals no address, and a client cannot forge one for a backend it was never
//! sent to. Values are computed once per backend (see [`crate::core::backend::Backend`]), so
//! recognising a cookie on the request path is a string comparison, not an HMAC.

use aws_lc_rs::hmac;
use http::HeaderValue;

use crate::core::backend::{AffinityCookieValue, BackendId};

/// Bytes of the HMAC kept in the cookie: 96 bits, as in many signed-cookie schemes.
const MAC_BYTES: usize = 12;

/// The affinity cookie's settings: its name, its attributes and the signing key.
#[derive(Clone)]
pub struct AffinityCookie {
    name: Box<str>,
    key: hmac::Key,
    path: Box<str>,
}

impl std::fmt::Debug for AffinityCookie {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AffinityCookie")
            .field("name", &self.name)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl AffinityCookie {
    /// A cookie named `name` signed with `secret`, scoped to `path` (the pool's path prefix,
    /// so pools sharing a host keep separate cookies).
    pub fn new(name: &str, secret: &[u8], path: &str) -> Self {
        AffinityCookie {
            name: name.into(),
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
            path: path.into(),
        }
    }

    /// The cookie's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The signed value naming `backend`.
    pub fn value_for(&self, backend: BackendId) -> String {
        let tag = hmac::sign(&self.key, &backend.0.to_be_bytes());
        let mut value = format!("{backend}.");
        for b in &tag.as_ref()[..MAC_BYTES] {
            value.push_str(&format!("{b:02x}"));
        }
        value
    }

    /// The request-side value and the `Set-Cookie` headers (plain and `Secure`) for `backend`.
    pub fn for_backend(&self, backend: BackendId) -> AffinityCookieValue {
        let value = self.value_for(backend);
        let header = format!(
            "{}={value}; Path={}; HttpOnly; SameSite=Lax",
            self.name, self.path
        );
        let secure = format!("{header}; Secure");
        AffinityCookieValue {
            value: value.into(),
            set_cookie: HeaderValue::try_from(header)
                .expect("cookie name, value and path are valid"),
            set_cookie_secure: HeaderValue::try_from(secure)
                .expect("cookie name, value and path are valid"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_deterministic_per_secret_and_reveal_no_address() {
        let c = AffinityCookie::new("tg", b"secret-one", "/");
        let id = BackendId::from_name("127.0.0.1:9001");
        assert_eq!(c.value_for(id), c.value_for(id));
        assert!(!c.value_for(id).contains("127.0.0.1"));
        let other = AffinityCookie::new("tg", b"secret-two", "/");
        assert_ne!(c.value_for(id), other.value_for(id));
        assert_ne!(c.value_for(id), c.value_for(BackendId::from_name("x")));
    }

    #[test]
    fn set_cookie_carries_the_attributes() {
        let c = AffinityCookie::new("tg", b"s", "/shop");
        let v = c.for_backend(BackendId(7));
        let header = v.set_cookie.to_str().unwrap();
        assert!(header.starts_with(&format!("tg={}", v.value)));
        assert!(header.contains("HttpOnly") && !header.contains("Secure"));
        assert!(v.set_cookie_secure.to_str().unwrap().ends_with("; Secure"));
        assert!(header.contains("Path=/shop;"));
    }
}
