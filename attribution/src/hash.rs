//! Client ids as they leave the host: a keyed hash (default), or the raw value made safe.
//!
//! The hash is BLAKE3 in keyed mode, its key derived from the key file with
//! `blake3::derive_key("outflow client id v1", file bytes)`; the id is `h:` and the first 96 bits
//! in lower-case hex. Every host with the same key file gives the same id for the same value, so
//! the collector can add them up, and nobody without the file can test a guess.
use std::fmt;

/// At least this many bytes in the key file.
pub const MIN_KEY_LEN: usize = 16;
/// An id has at most this many characters: the protocol's `ConnDelta.client_id` limit
/// (`outflow_proto::limits::MAX_CLIENT_ID_LEN`, copied so this crate stays free of the protocol).
pub const MAX_ID_CHARS: usize = 256;
/// Hex digits of a hashed id (96 bits).
const HASH_HEX_DIGITS: usize = 24;
const KEY_CONTEXT: &str = "outflow client id v1";

/// The key file is too short to be a secret.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "attribution.id_key_file: the key has {len} bytes, at least {MIN_KEY_LEN} are needed \
     (e.g. head -c 32 /dev/urandom > /etc/outflow/id.key, the same file on every host)"
)]
pub struct KeyTooShort {
    pub len: usize,
}

/// Turns id values (header values, annotations) into the ids that are reported.
#[derive(Clone)]
pub struct IdHasher {
    /// `None`: ids are kept raw.
    key: Option<[u8; 32]>,
}

impl fmt::Debug for IdHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the key.
        let mode = if self.key.is_some() { "keyed" } else { "raw" };
        f.debug_struct("IdHasher").field("mode", &mode).finish()
    }
}

impl IdHasher {
    /// Hashes ids with a key derived from the key file's bytes (all of them, as they are).
    pub fn keyed(key_file: &[u8]) -> Result<Self, KeyTooShort> {
        if key_file.len() < MIN_KEY_LEN {
            return Err(KeyTooShort {
                len: key_file.len(),
            });
        }
        Ok(Self {
            key: Some(blake3::derive_key(KEY_CONTEXT, key_file)),
        })
    }

    /// Keeps ids raw (`hash_ids = false`).
    pub fn raw() -> Self {
        Self { key: None }
    }

    /// The reported id of `value`, or `None` if it is empty (only blanks).
    ///
    /// Leading and trailing blanks are not part of the id. Keyed: `h:` + 24 hex digits. Raw: the
    /// value as lossy UTF-8, control characters replaced by U+FFFD, cut to [`MAX_ID_CHARS`].
    pub fn id(&self, value: &[u8]) -> Option<String> {
        let value = value.trim_ascii();
        if value.is_empty() {
            return None;
        }
        match &self.key {
            Some(key) => {
                let hash = blake3::keyed_hash(key, value);
                let hex = hash.to_hex();
                Some(format!("h:{}", &hex[..HASH_HEX_DIGITS]))
            }
            None => Some(
                String::from_utf8_lossy(value)
                    .chars()
                    .map(|c| if c.is_control() { '\u{FFFD}' } else { c })
                    .take(MAX_ID_CHARS)
                    .collect(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

    #[test]
    fn key_must_be_long_enough() {
        assert_eq!(
            IdHasher::keyed(b"short").unwrap_err(),
            KeyTooShort { len: 5 }
        );
        assert!(IdHasher::keyed(&KEY[..15]).is_err());
        assert!(IdHasher::keyed(&KEY[..16]).is_ok());
        let msg = KeyTooShort { len: 3 }.to_string();
        assert!(
            msg.starts_with("attribution.id_key_file: the key has 3 bytes"),
            "{msg}"
        );
    }

    #[test]
    fn keyed_ids() {
        let h = IdHasher::keyed(KEY).unwrap();
        let a = h.id(b"tenant-42").unwrap();
        assert_eq!(a.len(), 2 + 24);
        assert!(a.starts_with("h:"));
        assert!(
            a[2..]
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        );
        // Stable for a key, blanks around do not count, other values and keys differ.
        assert_eq!(h.id(b"  tenant-42\t").as_deref(), Some(a.as_str()));
        assert_ne!(h.id(b"tenant-43").unwrap(), a);
        let other = IdHasher::keyed(b"another key of 32 bytes, exactly").unwrap();
        assert_ne!(other.id(b"tenant-42").unwrap(), a);
        // The definition, spelled out.
        let key = blake3::derive_key("outflow client id v1", KEY);
        let want = blake3::keyed_hash(&key, b"tenant-42").to_hex();
        assert_eq!(a, format!("h:{}", &want[..24]));
        // The key does not show.
        assert_eq!(format!("{h:?}"), "IdHasher { mode: \"keyed\" }");
    }

    #[test]
    fn raw_ids() {
        let h = IdHasher::raw();
        let long = "x".repeat(300);
        let cases: &[(&[u8], Option<&str>)] = &[
            (b"", None),
            (b"  \t ", None),
            (b"alice", Some("alice")),
            (b" alice ", Some("alice")),
            (b"a\x01b\x7fc", Some("a\u{FFFD}b\u{FFFD}c")),
            (b"caf\xc3\xa9", Some("café")),
            (b"bad\xffutf8", Some("bad\u{FFFD}utf8")),
        ];
        for (value, want) in cases {
            assert_eq!(h.id(value).as_deref(), *want, "{value:?}");
        }
        assert_eq!(h.id(long.as_bytes()).unwrap(), "x".repeat(256));
        let wide = "é".repeat(300);
        assert_eq!(h.id(wide.as_bytes()).unwrap().chars().count(), 256);
    }

    proptest! {
        #[test]
        fn ids_are_bounded_and_clean(value in proptest::collection::vec(any::<u8>(), 0..2000)) {
            for h in [IdHasher::raw(), IdHasher::keyed(KEY).unwrap()] {
                if let Some(id) = h.id(&value) {
                    prop_assert!(!id.is_empty());
                    prop_assert!(id.chars().count() <= MAX_ID_CHARS);
                    prop_assert!(!id.chars().any(char::is_control));
                } else {
                    prop_assert!(value.trim_ascii().is_empty());
                }
            }
        }
    }
}
