//! The state file's format: every pool's pins in a compact binary form, with a format
//! version and a checksum, so that a restart keeps the sessions learned from pages. Encoding
//! and decoding are pure; `store::state_file` writes and reads the file.
//!
//! Layout, little-endian: `TGSTATE\0`, version (u32), written at (unix seconds, u32), pool
//! count (u32); per pool: name length (u16), name, pin count (u64), then per pin the 128-bit
//! key (2 × u64), backend id (u32), created (u32), last used (u32); last, the xxh3-64 of
//! everything before it (u64). 28 bytes per pin.

use crate::core::affinity::{Pin, PinKey};
use crate::core::backend::{BackendId, FIXED_SEED};

/// The file's first bytes.
pub const MAGIC: &[u8; 8] = b"TGSTATE\0";
/// The format written; others are refused.
pub const VERSION: u32 = 1;
/// Bytes of one pin.
pub const PIN_BYTES: usize = 28;

/// One pool's pins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolPins {
    /// The pool's name.
    pub pool: String,
    /// Its pins.
    pub pins: Vec<(PinKey, Pin)>,
}

/// What a state file holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Unix seconds when it was written.
    pub written_at: u32,
    /// Every pool's pins.
    pub pools: Vec<PoolPins>,
}

/// Why a state file's bytes were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Corrupt {
    /// Not a tidegate state file.
    #[error("not a tidegate state file")]
    Foreign,
    /// Written by another version of the format.
    #[error("format version {0}, this tidegate reads version {VERSION}")]
    Version(u32),
    /// Shorter than its own counts say.
    #[error("truncated")]
    Truncated,
    /// The checksum does not match.
    #[error("checksum mismatch")]
    Checksum,
    /// A pool name that is not UTF-8, or bytes after the last pool.
    #[error("malformed: {0}")]
    Malformed(&'static str),
}

/// Appends one pool's pins to an encoding begun by [`Encoder::new`].
pub struct Encoder {
    bytes: Vec<u8>,
    pools: u32,
    pools_at: usize,
    pins: u64,
}

impl Encoder {
    /// A snapshot written at `now`, with room for about `pins` pins.
    pub fn new(now: u32, pins: usize) -> Self {
        let mut bytes = Vec::with_capacity(24 + pins * PIN_BYTES + 8);
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&VERSION.to_le_bytes());
        bytes.extend_from_slice(&now.to_le_bytes());
        let pools_at = bytes.len();
        bytes.extend_from_slice(&0u32.to_le_bytes());
        Encoder {
            bytes,
            pools: 0,
            pools_at,
            pins: 0,
        }
    }

    /// Adds a pool; `pins` visits each of its pins once (the count is fixed up after).
    pub fn pool(&mut self, name: &str, pins: impl FnOnce(&mut dyn FnMut(PinKey, Pin))) {
        let name = &name.as_bytes()[..name.len().min(u16::MAX as usize)];
        self.bytes
            .extend_from_slice(&(name.len() as u16).to_le_bytes());
        self.bytes.extend_from_slice(name);
        let count_at = self.bytes.len();
        self.bytes.extend_from_slice(&0u64.to_le_bytes());
        let mut count = 0u64;
        let bytes = &mut self.bytes;
        pins(&mut |key: PinKey, pin: Pin| {
            let [a, b] = key.parts();
            bytes.extend_from_slice(&a.to_le_bytes());
            bytes.extend_from_slice(&b.to_le_bytes());
            bytes.extend_from_slice(&pin.backend.0.to_le_bytes());
            bytes.extend_from_slice(&pin.created.to_le_bytes());
            bytes.extend_from_slice(&pin.last_used.to_le_bytes());
            count += 1;
        });
        self.bytes[count_at..count_at + 8].copy_from_slice(&count.to_le_bytes());
        self.pools += 1;
        self.pins += count;
    }

    /// Pins added so far.
    pub fn pins(&self) -> u64 {
        self.pins
    }

    /// The finished bytes, checksum last.
    pub fn finish(mut self) -> Vec<u8> {
        let pools_at = self.pools_at;
        self.bytes[pools_at..pools_at + 4].copy_from_slice(&self.pools.to_le_bytes());
        let sum = xxhash_rust::xxh3::xxh3_64_with_seed(&self.bytes, FIXED_SEED);
        self.bytes.extend_from_slice(&sum.to_le_bytes());
        self.bytes
    }
}

/// Reads little-endian fields off the front of a slice.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Corrupt> {
        if self.0.len() < n {
            return Err(Corrupt::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u16(&mut self) -> Result<u16, Corrupt> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }

    fn u32(&mut self) -> Result<u32, Corrupt> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn u64(&mut self) -> Result<u64, Corrupt> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
}

/// Decodes a state file's bytes; anything but a whole, intact file of this version is
/// refused (never a panic, and no allocation beyond what the bytes can hold).
pub fn decode(bytes: &[u8]) -> Result<Snapshot, Corrupt> {
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        return Err(Corrupt::Foreign);
    }
    if bytes.len() < 20 + 8 {
        return Err(Corrupt::Truncated);
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(Corrupt::Version(version));
    }
    let (body, sum) = bytes.split_at(bytes.len() - 8);
    let sum = u64::from_le_bytes(sum.try_into().expect("8 bytes"));
    if xxhash_rust::xxh3::xxh3_64_with_seed(body, FIXED_SEED) != sum {
        return Err(Corrupt::Checksum);
    }
    let mut r = Reader(&body[12..]);
    let written_at = r.u32()?;
    let pool_count = r.u32()?;
    let mut pools = Vec::new();
    for _ in 0..pool_count {
        let name_len = usize::from(r.u16()?);
        let pool = std::str::from_utf8(r.take(name_len)?)
            .map_err(|_| Corrupt::Malformed("a pool name is not UTF-8"))?
            .to_string();
        let count = r.u64()?;
        // The count is checked against the bytes left before anything is allocated for it.
        let size = usize::try_from(count)
            .ok()
            .and_then(|n| n.checked_mul(PIN_BYTES))
            .ok_or(Corrupt::Truncated)?;
        let mut data = Reader(r.take(size)?);
        let mut pins = Vec::with_capacity(size / PIN_BYTES);
        for _ in 0..count {
            let key = PinKey::from_parts([data.u64()?, data.u64()?]);
            let pin = Pin {
                backend: BackendId(data.u32()?),
                created: data.u32()?,
                last_used: data.u32()?,
            };
            pins.push((key, pin));
        }
        pools.push(PoolPins { pool, pins });
    }
    if !r.0.is_empty() {
        return Err(Corrupt::Malformed("bytes after the last pool"));
    }
    Ok(Snapshot { written_at, pools })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Snapshot {
        let pin = |b, c, l| Pin {
            backend: BackendId(b),
            created: c,
            last_used: l,
        };
        Snapshot {
            written_at: 1_700_000_000,
            pools: vec![
                PoolPins {
                    pool: "shop".into(),
                    pins: vec![
                        (PinKey::of("S1"), pin(7, 10, 20)),
                        (PinKey::of("S2"), pin(8, 11, 21)),
                    ],
                },
                PoolPins {
                    pool: "empty".into(),
                    pins: Vec::new(),
                },
            ],
        }
    }

    fn encode(s: &Snapshot) -> Vec<u8> {
        let mut e = Encoder::new(s.written_at, 0);
        for p in &s.pools {
            e.pool(&p.pool, |visit| {
                for (k, pin) in &p.pins {
                    visit(*k, *pin);
                }
            });
        }
        e.finish()
    }

    #[test]
    fn a_snapshot_comes_back_as_it_was_written() {
        let s = sample();
        let bytes = encode(&s);
        assert_eq!(
            bytes.len(),
            20 + (2 + 4 + 8) + (2 + 5 + 8) + 2 * PIN_BYTES + 8
        );
        assert_eq!(decode(&bytes).unwrap(), s);
    }

    #[test]
    fn damaged_or_foreign_bytes_are_refused_by_name() {
        let bytes = encode(&sample());
        assert_eq!(decode(b"{\"pins\": []}"), Err(Corrupt::Foreign));
        assert_eq!(decode(&bytes[..bytes.len() - 3]), Err(Corrupt::Checksum));
        assert_eq!(decode(&bytes[..20]), Err(Corrupt::Truncated));
        let mut flipped = bytes.clone();
        flipped[40] ^= 1;
        assert_eq!(decode(&flipped), Err(Corrupt::Checksum));
        let mut other = bytes.clone();
        other[8] = 9;
        assert_eq!(decode(&other), Err(Corrupt::Version(9)));
    }

    proptest! {
        /// Whatever the bytes, decoding answers (never panics, never allocates for a count
        /// the bytes cannot hold).
        #[test]
        fn any_bytes_decode_or_are_refused(tail in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut bytes = MAGIC.to_vec();
            bytes.extend_from_slice(&VERSION.to_le_bytes());
            bytes.extend_from_slice(&tail);
            let _ = decode(&bytes);
            // With a valid checksum, so the counts themselves are read.
            let sum = xxhash_rust::xxh3::xxh3_64_with_seed(&bytes, FIXED_SEED);
            bytes.extend_from_slice(&sum.to_le_bytes());
            let _ = decode(&bytes);
        }
    }
}
