//! Stable hashes for ids and seeds. `std`'s hasher may change between Rust
//! releases; match ids, bandit seeds and window digests must not (a replay
//! on a newer worker must name the same match and pick the same arm), so
//! these are FNV-1a with the published parameters, over length-prefixed
//! fields so that ("ab", "c") and ("a", "bc") differ.

const FNV64_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV64_PRIME: u64 = 0x0000_0100_0000_01b3;
const FNV128_OFFSET: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
const FNV128_PRIME: u128 = 0x0000_0000_0100_0000_0000_0000_0000_013b;

/// FNV-1a over a sequence of fields, 64 and 128 bits at once.
#[derive(Debug, Clone)]
pub(crate) struct Digest {
    h64: u64,
    h128: u128,
}

impl Digest {
    pub(crate) fn new() -> Self {
        Digest {
            h64: FNV64_OFFSET,
            h128: FNV128_OFFSET,
        }
    }

    fn bytes(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.h64 = (self.h64 ^ u64::from(b)).wrapping_mul(FNV64_PRIME);
            self.h128 = (self.h128 ^ u128::from(b)).wrapping_mul(FNV128_PRIME);
        }
    }

    pub(crate) fn str(mut self, s: &str) -> Self {
        self.bytes(&(s.len() as u64).to_le_bytes());
        self.bytes(s.as_bytes());
        self
    }

    pub(crate) fn i64(mut self, v: i64) -> Self {
        self.bytes(&v.to_le_bytes());
        self
    }

    pub(crate) fn finish64(&self) -> u64 {
        self.h64
    }

    pub(crate) fn finish128(&self) -> u128 {
        self.h128
    }
}

/// The ids of a window's matches: 32 hex digits from the segment, the
/// window and the two request ids (in sorted order, so either side names
/// the same match). The segment and window are hashed once per window.
#[derive(Debug, Clone)]
pub(crate) struct MatchIds {
    window: Digest,
}

impl MatchIds {
    pub(crate) fn new(segment: &str, window_start: i64) -> Self {
        MatchIds {
            window: Digest::new().str(segment).i64(window_start),
        }
    }

    pub(crate) fn of(&self, a: &str, b: &str) -> String {
        let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
        hex32(self.window.clone().str(lo).str(hi).finish128())
    }
}

/// `format!("{:032x}", v)` without the formatting machinery (a match id per
/// pair, ~1,700 in a large window's close).
fn hex32(v: u128) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let digits: Vec<u8> = (0..32)
        .rev()
        .map(|i| DIGITS[((v >> (i * 4)) & 0xf) as usize])
        .collect();
    // Hex digits are ASCII.
    String::from_utf8(digits).unwrap_or_default()
}

/// The id of one match ([`MatchIds`]).
#[cfg(test)]
pub(crate) fn match_id(segment: &str, window_start: i64, a: &str, b: &str) -> String {
    MatchIds::new(segment, window_start).of(a, b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_matches_the_published_test_vector() {
        // FNV-1a 64 of "a" is 0xaf63dc4c8601ec8c (the reference suite).
        let mut d = Digest::new();
        d.bytes(b"a");
        assert_eq!(d.finish64(), 0xaf63_dc4c_8601_ec8c);
        // FNV-1a 128 of "a": d228cb696f1a8caf78912b704e4a8964.
        assert_eq!(d.finish128(), 0xd228_cb69_6f1a_8caf_7891_2b70_4e4a_8964);
    }

    #[test]
    fn match_ids_are_symmetric_and_field_separated() {
        let id = match_id("eu", 1000, "r1", "r2");
        assert_eq!(id.len(), 32);
        assert_eq!(id, match_id("eu", 1000, "r2", "r1"));
        assert_ne!(id, match_id("eu", 2000, "r1", "r2"));
        assert_ne!(id, match_id("eur", 1000, "1", "r2"));
        let d = Digest::new().str("eu").i64(1000).str("r1").str("r2");
        assert_eq!(id, format!("{:032x}", d.finish128()), "the digest in hex");
        for v in [0, 1, 0xab, u128::MAX, u128::MAX / 3] {
            assert_eq!(hex32(v), format!("{v:032x}"));
        }
        assert_ne!(
            Digest::new().str("ab").str("c").finish64(),
            Digest::new().str("a").str("bc").finish64()
        );
    }
}
