//! Floats of the changelog (bandit posteriors, a match's score) written as
//! JSON strings in Rust's shortest round-trip form and read back with
//! `str::parse`, which rounds correctly: a restored engine must sample and
//! decide with exactly the bits it had. serde_json's own number parser is
//! fast but may miss the last bit (exact parsing, its `float_roundtrip`
//! feature, would slow the parse of every request's vector instead). Plain
//! JSON numbers are still accepted when read.

use serde::{Deserialize, Deserializer, Serializer};

#[derive(Deserialize)]
#[serde(untagged)]
enum Written<T> {
    Text(String),
    Number(T),
}

fn read<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + std::str::FromStr,
    T::Err: std::fmt::Display,
{
    match Written::<T>::deserialize(d)? {
        Written::Number(v) => Ok(v),
        Written::Text(s) => s
            .parse()
            .map_err(|e| serde::de::Error::custom(format!("{s:?} is not a number: {e}"))),
    }
}

pub mod f64_text {
    use super::*;

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        read(d)
    }
}

pub mod f32_text {
    use super::*;

    pub fn serialize<S: Serializer>(v: &f32, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f32, D::Error> {
        read(d)
    }
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    #[derive(Debug, Serialize, Deserialize)]
    struct Both {
        #[serde(with = "super::f64_text")]
        wide: f64,
        #[serde(with = "super::f32_text")]
        narrow: f32,
    }

    /// Every bit pattern comes back exactly (NaN as some NaN).
    #[test]
    fn floats_round_trip_exactly() {
        let mut s = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..200_000 {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let v = Both {
                wide: f64::from_bits(s),
                narrow: f32::from_bits((s >> 17) as u32),
            };
            let back: Both = serde_json::from_slice(&serde_json::to_vec(&v).unwrap()).unwrap();
            if v.wide.is_nan() {
                assert!(back.wide.is_nan());
            } else {
                assert_eq!(back.wide.to_bits(), v.wide.to_bits(), "{:e}", v.wide);
            }
            if v.narrow.is_nan() {
                assert!(back.narrow.is_nan());
            } else {
                assert_eq!(back.narrow.to_bits(), v.narrow.to_bits(), "{:e}", v.narrow);
            }
        }
    }

    #[test]
    fn plain_numbers_are_read_too() {
        let b: Both = serde_json::from_str(r#"{"wide":1.5,"narrow":"0.25"}"#).unwrap();
        assert_eq!((b.wide, b.narrow), (1.5, 0.25));
        assert!(serde_json::from_str::<Both>(r#"{"wide":"x","narrow":1}"#).is_err());
    }
}
