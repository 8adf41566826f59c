//! The fast path for reading a match request.
//!
//! A worker reads every request of its partitions, and serde_json's generic
//! path (a visitor call, a peek and a bounds check per byte, each vector
//! value through `f64` and a visitor) was about 15% of a match worker's CPU
//! at 50,000 requests/s: the 32-value vector is most of a request's bytes.
//! [`read`] takes the form producers write — any key order, any JSON
//! whitespace, no escapes, no unknown or repeated keys, plain numbers — and
//! returns exactly the request serde_json would. Anything else is `None` and
//! goes to serde_json, which also words the errors; so does a value
//! serde_json would refuse. Property-tested against serde_json.
//!
//! Numbers are rebuilt the way serde_json (without `float_roundtrip`) builds
//! them: the digits as one `u64` significand and a power of ten, the
//! significand converted to `f64` and then multiplied or divided by the
//! (correctly rounded) power, and a vector value narrowed from that `f64` to
//! `f32`; integers without a fraction or exponent stay integers until they
//! are narrowed. Same operations in the same order: the same bits.

use std::sync::OnceLock;

use super::{MatchRequest, Preferences, Profile};

/// Room reserved for a vector up front (the issue's dimension).
const RESERVED: usize = 32;

/// Digits a number may have on the fast path: 18 keep every integer within
/// `i64` and every significand far from `u64`'s overflow.
const MAX_DIGITS: u32 = 18;

/// The request in `bytes`, if it is in the plain form; `None` otherwise.
pub(super) fn read(bytes: &[u8]) -> Option<MatchRequest> {
    let mut r = Reader { b: bytes, at: 0 };
    let request = r.request()?;
    r.skip_whitespace();
    (r.at == bytes.len()).then_some(request)
}

/// A JSON number as serde_json reads it before it becomes a value.
#[derive(Debug, Clone, Copy)]
struct Number {
    negative: bool,
    significand: u64,
    /// The power of ten the significand is scaled by.
    exponent: i32,
    /// Written without a fraction or an exponent.
    integer: bool,
}

impl Number {
    /// The value as an `i64`, for integers only (serde_json refuses a
    /// fraction or exponent for an integer field; so does `-0`, which it
    /// reads as a float).
    fn to_i64(self) -> Option<i64> {
        if !self.integer || (self.negative && self.significand == 0) {
            return None;
        }
        let magnitude = self.significand as i64;
        Some(if self.negative { -magnitude } else { magnitude })
    }

    /// The value as serde_json hands an `f32` field: integers narrowed from
    /// the integer, the rest from serde_json's `f64`.
    fn to_f32(self) -> Option<f32> {
        if self.integer {
            return Some(match (self.negative, self.significand) {
                (true, 0) => -0.0,
                (true, s) => -(s as i64) as f32,
                (false, s) => s as f32,
            });
        }
        let powers = powers_of_ten();
        let power = *powers.get(self.exponent.unsigned_abs() as usize)?;
        let mut f = self.significand as f64;
        if self.exponent >= 0 {
            f *= power;
            if f.is_infinite() {
                return None;
            }
        } else {
            f /= power;
        }
        Some(if self.negative { -f } else { f } as f32)
    }
}

/// 1e0 ..= 1e308, each correctly rounded (as the literals are).
fn powers_of_ten() -> &'static [f64; 309] {
    static POWERS: OnceLock<[f64; 309]> = OnceLock::new();
    POWERS
        .get_or_init(|| std::array::from_fn(|k| format!("1e{k}").parse().expect("a power of ten")))
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn skip_whitespace(&mut self) {
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.b.get(self.at) {
            self.at += 1;
        }
    }

    /// The next byte after whitespace, not consumed.
    fn peek(&mut self) -> Option<u8> {
        self.skip_whitespace();
        self.b.get(self.at).copied()
    }

    /// Consumes `c` (after whitespace), or fails.
    fn eat(&mut self, c: u8) -> Option<()> {
        (self.peek()? == c).then(|| self.at += 1)
    }

    /// A string without escapes or control characters.
    fn str(&mut self) -> Option<&'a str> {
        self.eat(b'"')?;
        let rest = &self.b[self.at..];
        let len = rest
            .iter()
            .position(|&c| c == b'"' || c == b'\\' || c < 0x20)?;
        if rest[len] != b'"' {
            return None;
        }
        self.at += len + 1;
        std::str::from_utf8(&rest[..len]).ok()
    }

    fn string(&mut self) -> Option<String> {
        self.str().map(str::to_owned)
    }

    /// `{ "key": value, ... }`, each value read by `field(self, key)`.
    fn object(&mut self, mut field: impl FnMut(&mut Self, &str) -> Option<()>) -> Option<()> {
        self.list(b'{', b'}', |r| {
            let key = r.str()?;
            r.eat(b':')?;
            field(r, key)
        })
    }

    /// `[ item, ... ]`, each item read by `item(self)`.
    fn array(&mut self, item: impl FnMut(&mut Self) -> Option<()>) -> Option<()> {
        self.list(b'[', b']', item)
    }

    /// `open item, item ... close`, possibly empty, no trailing comma.
    fn list(
        &mut self,
        open: u8,
        close: u8,
        mut item: impl FnMut(&mut Self) -> Option<()>,
    ) -> Option<()> {
        self.eat(open)?;
        if self.peek()? == close {
            self.at += 1;
            return Some(());
        }
        loop {
            item(self)?;
            match self.peek()? {
                b',' => self.at += 1,
                c if c == close => {
                    self.at += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    fn number(&mut self) -> Option<Number> {
        self.skip_whitespace();
        // Locals, not fields, in the loops: they stay in registers.
        let b = self.b;
        let mut at = self.at;
        let negative = b.get(at) == Some(&b'-');
        at += usize::from(negative);
        let mut significand = 0;
        let first = *b.get(at)?;
        let int_digits = digits(b, &mut at, &mut significand, MAX_DIGITS);
        // JSON: at least one digit, no leading zero before more digits.
        if int_digits == 0 || int_digits > MAX_DIGITS || (first == b'0' && int_digits > 1) {
            return None;
        }
        let mut exponent = 0i32;
        let mut integer = true;
        if b.get(at) == Some(&b'.') {
            at += 1;
            let frac_digits = digits(b, &mut at, &mut significand, MAX_DIGITS - int_digits);
            if frac_digits == 0 || int_digits + frac_digits > MAX_DIGITS {
                return None;
            }
            exponent = -(frac_digits as i32);
            integer = false;
        }
        if let Some(b'e' | b'E') = b.get(at) {
            at += 1;
            let negative_exponent = b.get(at) == Some(&b'-');
            at += usize::from(matches!(b.get(at), Some(b'-' | b'+')));
            let mut e = 0;
            // Four digits cover every exponent with a power in the table.
            let e_digits = digits(b, &mut at, &mut e, 4);
            if e_digits == 0 || e_digits > 4 {
                return None;
            }
            exponent += if negative_exponent {
                -(e as i32)
            } else {
                e as i32
            };
            integer = false;
        }
        self.at = at;
        Some(Number {
            negative,
            significand,
            exponent,
            integer,
        })
    }

    fn int<T: TryFrom<i64>>(&mut self) -> Option<T> {
        T::try_from(self.number()?.to_i64()?).ok()
    }

    fn request(&mut self) -> Option<MatchRequest> {
        let (mut request_id, mut user, mut segment) = (None, None, None);
        let (mut event_time, mut vector, mut profile, mut wants) = (None, None, None, None);
        self.object(|r, key| match key {
            "requestId" => set(&mut request_id, r.string()?),
            "user" => set(&mut user, r.string()?),
            "segment" => set(&mut segment, r.string()?),
            "eventTime" => set(&mut event_time, r.int()?),
            "vector" => set(&mut vector, r.vector()?),
            "profile" => set(&mut profile, r.profile()?),
            "wants" => set(&mut wants, r.preferences()?),
            _ => None,
        })?;
        Some(MatchRequest {
            request_id: request_id?,
            user: user?,
            segment: segment?,
            event_time: event_time?,
            vector: vector?,
            profile: profile?,
            wants: wants?,
        })
    }

    fn vector(&mut self) -> Option<Vec<f32>> {
        let mut v = Vec::with_capacity(RESERVED);
        self.array(|r| {
            v.push(r.number()?.to_f32()?);
            Some(())
        })?;
        Some(v)
    }

    fn profile(&mut self) -> Option<Profile> {
        let (mut gender, mut age) = (None, None);
        self.object(|r, key| match key {
            "gender" => set(&mut gender, r.string()?),
            "age" => set(&mut age, r.int()?),
            _ => None,
        })?;
        Some(Profile {
            gender: gender?,
            age: age?,
        })
    }

    fn preferences(&mut self) -> Option<Preferences> {
        let (mut genders, mut min_age, mut max_age) = (None, None, None);
        self.object(|r, key| match key {
            "genders" => {
                let mut list = Vec::new();
                r.array(|r| {
                    list.push(r.string()?);
                    Some(())
                })?;
                set(&mut genders, list)
            }
            "minAge" => set(&mut min_age, r.int()?),
            "maxAge" => set(&mut max_age, r.int()?),
            _ => None,
        })?;
        Some(Preferences {
            genders: genders.unwrap_or_default(),
            min_age: min_age?,
            max_age: max_age?,
        })
    }
}

/// The digits of `b` from `*at` into `significand`; how many. More than
/// `budget` is not the fast path: it stops there, before `significand`
/// overflows.
#[inline(always)]
fn digits(b: &[u8], at: &mut usize, significand: &mut u64, budget: u32) -> u32 {
    let mut count = 0;
    // Eight at a time while they last (a vector value has about eight).
    while count + 8 <= budget {
        let Some(value) = b
            .get(*at..*at + 8)
            .and_then(|eight| eight_digits(eight.try_into().expect("eight bytes")))
        else {
            break;
        };
        *significand = *significand * 100_000_000 + value;
        *at += 8;
        count += 8;
    }
    while let Some(&c @ b'0'..=b'9') = b.get(*at) {
        if count == budget {
            return budget + 1;
        }
        *significand = *significand * 10 + u64::from(c - b'0');
        *at += 1;
        count += 1;
    }
    count
}

/// The value of eight ASCII digits, or None if any byte is not a digit:
/// one word, three multiplications (SWAR) instead of eight steps.
fn eight_digits(bytes: [u8; 8]) -> Option<u64> {
    let word = u64::from_le_bytes(bytes);
    // Every byte 0x30..=0x39: its high nibble is 3, and adding 6 to it
    // does not carry out of the low nibble.
    let all_digits = (word & 0xF0F0_F0F0_F0F0_F0F0) == 0x3030_3030_3030_3030
        && (word.wrapping_add(0x0606_0606_0606_0606) & 0xF0F0_F0F0_F0F0_F0F0)
            == 0x3030_3030_3030_3030;
    if !all_digits {
        return None;
    }
    // The first digit is the lowest byte: pairs, then quads, then all eight.
    let d = word - 0x3030_3030_3030_3030;
    let pairs = (d * 10 + (d >> 8)) & 0x00FF_00FF_00FF_00FF;
    let quads = (pairs * 100 + (pairs >> 16)) & 0x0000_FFFF_0000_FFFF;
    Some((quads * 10_000 + (quads >> 32)) & 0xFFFF_FFFF)
}

/// Fills a field read once; a repeated key (which serde_json refuses) fails.
fn set<T>(slot: &mut Option<T>, value: T) -> Option<()> {
    slot.is_none().then(|| *slot = Some(value))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn serde(bytes: &[u8]) -> Option<MatchRequest> {
        serde_json::from_slice(bytes).ok()
    }

    /// The same request, every float compared by its bits.
    fn same(a: &MatchRequest, b: &MatchRequest) -> bool {
        a == b
            && a.vector
                .iter()
                .zip(&b.vector)
                .all(|(x, y)| x.to_bits() == y.to_bits())
    }

    fn arb_text() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => "[a-z0-9-]{1,12}",
            1 => "[ -~]{0,6}",
            1 => "\\PC{0,4}",
        ]
    }

    fn arb_float() -> impl Strategy<Value = f32> {
        prop_oneof![
            6 => -1.0f32..1.0,
            1 => any::<f32>().prop_filter("finite", |f| f.is_finite()),
            1 => prop::sample::select(vec![0.0, -0.0, 1.0, -1.0, 1e-7, 3.0e38]),
        ]
    }

    fn arb_request() -> impl Strategy<Value = MatchRequest> {
        (
            (arb_text(), arb_text(), arb_text(), any::<i64>()),
            prop::collection::vec(arb_float(), 0..40),
            (arb_text(), any::<u8>()),
            (
                prop::collection::vec(arb_text(), 0..3),
                any::<u8>(),
                any::<u8>(),
            ),
        )
            .prop_map(
                |((id, user, segment, t), vector, (gender, age), (genders, lo, hi))| MatchRequest {
                    request_id: id,
                    user,
                    segment,
                    event_time: t,
                    vector,
                    profile: Profile { gender, age },
                    wants: Preferences {
                        genders,
                        min_age: lo,
                        max_age: hi,
                    },
                },
            )
    }

    /// Numbers as people write them, valid JSON or not.
    fn arb_number_text() -> impl Strategy<Value = String> {
        prop_oneof![
            "-?(0|[1-9][0-9]{0,20})(\\.[0-9]{1,22})?([eE][+-]?[0-9]{1,4})?",
            "-?[0-9]{1,3}\\.?[0-9]{0,3}[eE]?[+-]?[0-9]{0,3}",
            prop::sample::select(vec![
                "-0",
                "0",
                "1e308",
                "1e309",
                "2e-324",
                "-0.0",
                "1.",
                ".5",
                "01",
                "1e400",
                "0.000000000000000000001",
                "18446744073709551615",
                "-9223372036854775808",
                "255",
                "256",
                "-1",
                "1.0",
                "1e2",
                "NaN",
                "Infinity",
                "null",
                "\"1\"",
            ])
            .prop_map(str::to_owned),
        ]
    }

    proptest! {
        #[test]
        fn eight_digits_are_read_as_a_number(bytes in prop::array::uniform8(prop_oneof![
            8 => b'0'..=b'9',
            1 => any::<u8>(),
        ])) {
            let text = std::str::from_utf8(&bytes).ok().filter(|t| t.bytes().all(|b| b.is_ascii_digit()));
            prop_assert_eq!(eight_digits(bytes), text.map(|t| t.parse::<u64>().unwrap()));
        }
    }

    #[test]
    fn the_plain_form_takes_the_fast_path() {
        let request = MatchRequest {
            request_id: "r-1".into(),
            user: "u-7".into(),
            segment: "eu-en".into(),
            event_time: 1_764_000_000_123,
            vector: vec![0.125, -0.33333334, 1e-7, 0.0, -0.0, 1.0],
            profile: Profile {
                gender: "f".into(),
                age: 29,
            },
            wants: Preferences {
                genders: vec!["m".into(), "x".into()],
                min_age: 25,
                max_age: 35,
            },
        };
        let compact = serde_json::to_vec(&request).unwrap();
        let pretty = serde_json::to_vec_pretty(&request).unwrap();
        for bytes in [compact, pretty] {
            let fast = read(&bytes).expect("the plain form");
            assert!(same(&fast, &request), "{fast:?}");
        }
    }

    #[test]
    fn anything_unusual_is_left_to_serde() {
        let base = r#"{"requestId":"r","user":"u","segment":"s","eventTime":1,"vector":[0.5],"profile":{"gender":"f","age":20},"wants":{"minAge":18,"maxAge":30}}"#;
        assert!(read(base.as_bytes()).is_some());
        for (from, to) in [
            (r#""user":"u""#, r#""user":"\u0075""#),
            (r#""user":"u""#, r#""user":"u","user":"v""#),
            (r#""user":"u""#, r#""user":"u","extra":1"#),
            (r#""eventTime":1"#, r#""eventTime":1.0"#),
            (r#""age":20"#, r#""age":-0"#),
            (r#""age":20"#, r#""age":256"#),
            (r#""age":20"#, r#""age":020"#),
            (r#"[0.5]"#, r#"[0.5,]"#),
            (r#"[0.5]"#, r#"[1e400]"#),
            (r#""minAge":18"#, r#""minAge":null"#),
        ] {
            let text = base.replacen(from, to, 1);
            assert!(read(text.as_bytes()).is_none(), "{text}");
        }
        assert!(read(format!("{base} x").as_bytes()).is_none());
        assert!(read(format!(" \n{base}\t ").as_bytes()).is_some());
    }

    proptest! {
        #[test]
        fn serialised_requests_read_as_serde_reads_them(req in arb_request(), pretty in any::<bool>()) {
            let bytes = if pretty {
                serde_json::to_vec_pretty(&req).unwrap()
            } else {
                serde_json::to_vec(&req).unwrap()
            };
            let want = serde(&bytes).expect("serde reads what it wrote");
            match read(&bytes) {
                Some(fast) => prop_assert!(same(&fast, &want), "{:?} / {:?}", fast, want),
                // Only escapes (quotes, backslashes, control characters)
                // and integers of 19 digits leave the fast path.
                None => prop_assert!(
                    bytes.contains(&b'\\') || req.event_time.unsigned_abs() >= 10u64.pow(MAX_DIGITS),
                    "{}", String::from_utf8_lossy(&bytes)
                ),
            }
        }

        #[test]
        fn written_numbers_read_as_serde_reads_them(
            values in prop::collection::vec(arb_number_text(), 1..4),
            integers in (arb_number_text(), arb_number_text()),
            in_integers in any::<bool>(),
        ) {
            // Numbers either in the vector or in the integer fields, so that
            // the rest of the request is valid and the fast path is tried.
            let varied = if in_integers { vec![integers.0.clone(), integers.1.clone()] } else { values.clone() };
            let (vector, (age, time)) = if in_integers {
                ("0.5".to_owned(), integers)
            } else {
                (values.join(","), ("20".to_owned(), "7".to_owned()))
            };
            let text = format!(
                r#"{{"requestId":"r","user":"u","segment":"s","eventTime":{time},"vector":[{vector}],"profile":{{"gender":"f","age":{age}}},"wants":{{"genders":[],"minAge":18,"maxAge":30}}}}"#,
            );
            let want = serde(text.as_bytes());
            match read(text.as_bytes()) {
                Some(fast) => prop_assert!(want.as_ref().is_some_and(|w| same(&fast, w)), "{} -> {:?} / {:?}", text, fast, want),
                // Valid numbers leave it only for many digits or an exponent.
                None => prop_assert!(
                    want.is_none() || varied.iter().any(|n| {
                        n.contains(['e', 'E']) || n.bytes().filter(u8::is_ascii_digit).count() > MAX_DIGITS as usize
                    }),
                    "{} left the fast path", text
                ),
            }
        }

        #[test]
        fn damaged_records_are_never_read_differently(req in arb_request(), cut in any::<prop::sample::Index>(), byte in any::<u8>(), op in 0u8..3) {
            let mut bytes = serde_json::to_vec(&req).unwrap();
            let at = cut.index(bytes.len());
            match op {
                0 => { bytes.remove(at); }
                1 => bytes[at] = byte,
                _ => bytes.insert(at, byte),
            }
            if let Some(fast) = read(&bytes) {
                let want = serde(&bytes);
                prop_assert!(want.as_ref().is_some_and(|w| same(&fast, w)), "{} -> {:?} / {:?}", String::from_utf8_lossy(&bytes), fast, want);
            }
        }
    }
}
