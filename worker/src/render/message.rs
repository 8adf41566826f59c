//! What makes a Kafka message a render task, and what makes it malformed.
//! The task key names the published file, so it must be a safe file name;
//! anything else goes to the dead-letter topic with the reason.

/// The largest message value a render accepts.
pub const MAX_VALUE_BYTES: usize = 1 << 20;

/// A message that is a valid task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Task {
    pub key: String,
    pub partition: i32,
    pub offset: i64,
    pub value: Vec<u8>,
    pub event_time_millis: i64,
}

/// Why a message cannot be rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("the message has no key; the key names the task")]
    NoKey,
    #[error("the key is not UTF-8")]
    KeyNotUtf8,
    #[error(
        "the key {0:?} is not a safe file name: use 1-200 of [A-Za-z0-9._-], not starting with '.'"
    )]
    KeyNotAFileName(String),
    #[error("the value has {0} bytes; the limit is {MAX_VALUE_BYTES}")]
    ValueTooLarge(usize),
}

/// Checks one message.
pub fn parse(
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    partition: i32,
    offset: i64,
    event_time_millis: i64,
) -> Result<Task, Malformed> {
    let key = key.ok_or(Malformed::NoKey)?;
    let key = std::str::from_utf8(key).map_err(|_| Malformed::KeyNotUtf8)?;
    if !is_safe_file_name(key) {
        return Err(Malformed::KeyNotAFileName(key.chars().take(64).collect()));
    }
    let value = value.unwrap_or_default();
    if value.len() > MAX_VALUE_BYTES {
        return Err(Malformed::ValueTooLarge(value.len()));
    }
    Ok(Task {
        key: key.to_string(),
        partition,
        offset,
        value: value.to_vec(),
        event_time_millis,
    })
}

fn is_safe_file_name(key: &str) -> bool {
    (1..=200).contains(&key.len())
        && !key.starts_with('.')
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_keyed_message_is_a_task() {
        let t = parse(Some(b"user-1"), Some(b"{}"), 2, 9, 1000).unwrap();
        assert_eq!((t.key.as_str(), t.partition, t.offset), ("user-1", 2, 9));
    }

    #[test]
    fn malformed_messages_say_why() {
        assert_eq!(parse(None, None, 0, 0, 0), Err(Malformed::NoKey));
        assert_eq!(
            parse(Some(&[0xff]), None, 0, 0, 0),
            Err(Malformed::KeyNotUtf8)
        );
        for bad in ["../etc", ".hidden", "a/b", "", "a b"] {
            assert!(
                matches!(
                    parse(Some(bad.as_bytes()), None, 0, 0, 0),
                    Err(Malformed::KeyNotAFileName(_))
                ),
                "{bad}"
            );
        }
        let big = vec![0u8; MAX_VALUE_BYTES + 1];
        assert_eq!(
            parse(Some(b"k"), Some(&big), 0, 0, 0),
            Err(Malformed::ValueTooLarge(MAX_VALUE_BYTES + 1))
        );
    }

    proptest! {
        #[test]
        fn never_panics_and_accepted_keys_stay_inside_a_folder(key in proptest::collection::vec(any::<u8>(), 0..260)) {
            if let Ok(t) = parse(Some(&key), None, 0, 0, 0) {
                let joined = std::path::Path::new("/out").join(&t.key);
                prop_assert_eq!(joined.parent(), Some(std::path::Path::new("/out")));
            }
        }
    }
}
