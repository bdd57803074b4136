//! The inserted affinity cookie: an opaque, HMAC-signed token naming a backend.
//!
//! The value is the backend's stable id and a truncated HMAC-SHA256 of it under the operator's
//! secret: it reveals no address, and a client cannot forge one for a backend it was never
//! sent to. Values are computed once per backend (see [`crate::core::backend::Backend`]), so
//! recognising a cookie on the request path is a string comparison, not an HMAC.
//!
//! Secrets rotate: the first secret signs every cookie set, and the older ones still verify
//! the cookies browsers hold (each backend's value under each of them is computed once too),
//! so a new secret never sends a returning browser elsewhere.

use aws_lc_rs::hmac;
use http::HeaderValue;

use crate::core::backend::{AffinityCookieValue, BackendId};

/// Bytes of the HMAC kept in the cookie: 96 bits, as in many signed-cookie schemes.
const MAC_BYTES: usize = 12;

/// The affinity cookie's settings: its name, its attributes, the signing key and the older
/// keys that still verify.
#[derive(Clone)]
pub struct AffinityCookie {
    name: Box<str>,
    key: hmac::Key,
    older: Box<[hmac::Key]>,
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
            older: Box::default(),
            path: path.into(),
        }
    }

    /// The same cookie also accepting the values `older` secrets signed (secrets being
    /// rotated out): requests carrying them are recognised, and their replies get the value
    /// of the signing secret.
    pub fn also_verifying(self, older: &[impl AsRef<[u8]>]) -> Self {
        AffinityCookie {
            older: older
                .iter()
                .map(|s| hmac::Key::new(hmac::HMAC_SHA256, s.as_ref()))
                .collect(),
            ..self
        }
    }

    /// The cookie's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The value naming `backend`, signed with the signing secret.
    pub fn value_for(&self, backend: BackendId) -> String {
        signed(&self.key, backend)
    }

    /// The request-side values (under every secret) and the `Set-Cookie` headers (plain and
    /// `Secure`) for `backend`.
    pub fn for_backend(&self, backend: BackendId) -> AffinityCookieValue {
        let value = self.value_for(backend);
        let older = self
            .older
            .iter()
            .map(|k| signed(k, backend).into())
            .collect();
        let header = format!(
            "{}={value}; Path={}; HttpOnly; SameSite=Lax",
            self.name, self.path
        );
        let secure = format!("{header}; Secure");
        AffinityCookieValue {
            value: value.into(),
            older,
            set_cookie: HeaderValue::try_from(header)
                .expect("cookie name, value and path are valid"),
            set_cookie_secure: HeaderValue::try_from(secure)
                .expect("cookie name, value and path are valid"),
        }
    }
}

/// `backend`'s id and the first [`MAC_BYTES`] of its HMAC under `key`, in hex.
fn signed(key: &hmac::Key, backend: BackendId) -> String {
    let tag = hmac::sign(key, &backend.0.to_be_bytes());
    let mut value = format!("{backend}.");
    for b in &tag.as_ref()[..MAC_BYTES] {
        value.push_str(&format!("{b:02x}"));
    }
    value
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
    fn older_secrets_verify_and_the_first_signs() {
        let id = BackendId::from_name("web1");
        let old = AffinityCookie::new("tg", b"old-secret-16-bytes", "/");
        let new = AffinityCookie::new("tg", b"new-secret-16-bytes", "/");
        let rotating = AffinityCookie::new("tg", b"new-secret-16-bytes", "/")
            .also_verifying(&[b"old-secret-16-bytes"]);
        let v = rotating.for_backend(id);
        assert_eq!(*v.value, new.value_for(id), "the new secret signs");
        assert!(v.set_cookie.to_str().unwrap().contains(&*v.value));
        assert!(v.accepts(&new.value_for(id)) && v.is_current(&new.value_for(id)));
        assert!(
            v.accepts(&old.value_for(id)) && !v.is_current(&old.value_for(id)),
            "the old secret still verifies, and its cookie is replaced"
        );
        let other = AffinityCookie::new("tg", b"other-secret-16-b", "/");
        assert!(!v.accepts(&other.value_for(id)));
        assert!(!v.accepts(&old.value_for(BackendId::from_name("web2"))));
        assert!(
            !new.for_backend(id).accepts(&old.value_for(id)),
            "a dropped secret verifies nothing"
        );
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
