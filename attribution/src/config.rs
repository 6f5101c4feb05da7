//! The `[attribution]` section of the agent's TOML: which peers are believed, which headers name
//! the client, how ids are kept. A leaf module: it depends on nothing else in the crate.
use std::path::PathBuf;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize};

/// At most this many `[[attribution.headers]]` rules.
pub const MAX_HEADER_RULES: usize = 16;
/// A configured header name has at most this many characters.
pub const MAX_HEADER_NAME_LEN: usize = 64;
/// At most this many `trusted_peers` networks (each hop of each turn is checked against all).
pub const MAX_TRUSTED_PEERS: usize = 1024;

/// A setting that cannot be used, with the field at fault (`attribution.headers[2].name`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// The `[attribution]` section. Every field has a default; [`Settings::validate`] checks them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Balancers and gateways whose PROXY preambles and forwarding headers are believed.
    pub trusted_peers: Vec<IpNet>,
    /// Look for a PROXY v1/v2 header at the start of each connection.
    pub proxy_protocol: bool,
    /// Replace ids by a keyed hash (`h:` + 24 hex digits); `false` keeps them raw.
    pub hash_ids: bool,
    /// File holding the secret of the keyed hash (at least 16 bytes, the same on every host).
    pub id_key_file: Option<PathBuf>,
    /// Accept client ids that the serving application sets on its socket.
    pub annotations: bool,
    /// Which source wins when several name the client; highest first.
    pub precedence: Vec<SourceKind>,
    /// Headers that carry the client's address or id, in the order they are tried.
    pub headers: Vec<HeaderRule>,
    /// Bytes the kernel captures at the start of each request (turn) to read the PROXY header
    /// and request headers from; a header block longer than this is not attributed.
    pub capture_bytes: u32,
    /// Size of the kernel's event ring buffer, in bytes (a power of two): requests whose
    /// capture finds it full are counted but not attributed.
    pub ring_bytes: u32,
}

/// Smallest and largest `capture_bytes` (the kernel's event holds at most 4096).
pub const CAPTURE_BYTES: std::ops::RangeInclusive<u32> = 64..=4096;
/// Smallest and largest `ring_bytes`.
pub const RING_BYTES: std::ops::RangeInclusive<u32> = (64 << 10)..=(1 << 30);

impl Default for Settings {
    fn default() -> Self {
        Self {
            trusted_peers: Vec::new(),
            proxy_protocol: true,
            hash_ids: true,
            id_key_file: None,
            annotations: false,
            precedence: SourceKind::DEFAULT_PRECEDENCE.to_vec(),
            headers: Vec::new(),
            capture_bytes: 4096,
            ring_bytes: 8 << 20,
        }
    }
}

/// The kinds of source that `precedence` orders.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// A client id set on the socket by the serving application.
    Annotation,
    /// A configured forwarding or id header, from a trusted sender.
    Header,
    /// The source address of a PROXY header from a trusted peer.
    Proxy,
    /// The TCP peer itself.
    Peer,
}

impl SourceKind {
    pub const DEFAULT_PRECEDENCE: [SourceKind; 4] = [
        SourceKind::Annotation,
        SourceKind::Header,
        SourceKind::Proxy,
        SourceKind::Peer,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::Annotation => "annotation",
            SourceKind::Header => "header",
            SourceKind::Proxy => "proxy",
            SourceKind::Peer => "peer",
        }
    }
}

/// One `[[attribution.headers]]` rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderRule {
    /// Header name, matched case-insensitively; stored lower-case.
    #[serde(deserialize_with = "lower_case")]
    pub name: String,
    pub kind: HeaderKind,
}

/// What a configured header carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HeaderKind {
    /// Client addresses (`X-Forwarded-For`, `Forwarded`, `X-Real-IP`, ...).
    Address,
    /// An opaque client id (an API key id, a tenant), hashed unless `hash_ids = false`.
    Id,
}

fn lower_case<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    String::deserialize(d).map(|s| s.to_ascii_lowercase())
}

/// RFC 7230 `tchar`: the characters a header name (a `token`) may hold.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

impl Settings {
    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !CAPTURE_BYTES.contains(&self.capture_bytes) {
            return Err(invalid(
                "attribution.capture_bytes",
                format!(
                    "must be between {} and {} (got {})",
                    CAPTURE_BYTES.start(),
                    CAPTURE_BYTES.end(),
                    self.capture_bytes
                ),
            ));
        }
        if !RING_BYTES.contains(&self.ring_bytes) || !self.ring_bytes.is_power_of_two() {
            return Err(invalid(
                "attribution.ring_bytes",
                format!(
                    "must be a power of two between {} and {} (got {})",
                    RING_BYTES.start(),
                    RING_BYTES.end(),
                    self.ring_bytes
                ),
            ));
        }
        if self.trusted_peers.len() > MAX_TRUSTED_PEERS {
            return Err(invalid(
                "attribution.trusted_peers",
                format!(
                    "at most {MAX_TRUSTED_PEERS} networks (got {})",
                    self.trusted_peers.len()
                ),
            ));
        }
        if self.headers.len() > MAX_HEADER_RULES {
            return Err(invalid(
                "attribution.headers",
                format!(
                    "at most {MAX_HEADER_RULES} rules (got {})",
                    self.headers.len()
                ),
            ));
        }
        for (i, rule) in self.headers.iter().enumerate() {
            let field = format!("attribution.headers[{i}].name");
            let name = rule.name.as_bytes();
            if name.is_empty()
                || name.len() > MAX_HEADER_NAME_LEN
                || !name.iter().all(|&b| is_tchar(b))
            {
                return Err(invalid(
                    field,
                    format!(
                        "not a valid header name ({:?}): 1 to {MAX_HEADER_NAME_LEN} of the characters A-Z a-z 0-9 !#$%&'*+-.^_`|~",
                        rule.name
                    ),
                ));
            }
            if let Some(j) = self.headers[..i]
                .iter()
                .position(|r| r.name.eq_ignore_ascii_case(&rule.name))
            {
                return Err(invalid(
                    field,
                    format!(
                        "{:?} is already configured in attribution.headers[{j}]",
                        rule.name
                    ),
                ));
            }
        }
        let each_once = self.precedence.len() == SourceKind::DEFAULT_PRECEDENCE.len()
            && SourceKind::DEFAULT_PRECEDENCE
                .iter()
                .all(|k| self.precedence.contains(k));
        if !each_once {
            return Err(invalid(
                "attribution.precedence",
                "must list each of annotation, header, proxy, peer once",
            ));
        }
        if self.hash_ids && self.ids_possible() && self.id_key_file.is_none() {
            return Err(invalid(
                "attribution.id_key_file",
                "required when hash_ids is true and ids can occur (an id header or annotations = true); \
                 put the same secret on every host (e.g. head -c 32 /dev/urandom > /etc/outflow/id.key)",
            ));
        }
        Ok(())
    }

    /// Whether the kernel must capture the first bytes of each turn at all.
    pub fn captures(&self) -> bool {
        self.proxy_protocol || !self.headers.is_empty()
    }

    /// Whether a client id can come from anywhere: an id header or socket annotations.
    pub fn ids_possible(&self) -> bool {
        self.annotations || self.headers.iter().any(|h| h.kind == HeaderKind::Id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str) -> Settings {
        #[derive(Deserialize)]
        struct File {
            attribution: Settings,
        }
        toml::from_str::<File>(toml_text)
            .unwrap_or_else(|e| panic!("cannot parse {toml_text:?}: {e}"))
            .attribution
    }

    fn rule(name: &str, kind: HeaderKind) -> HeaderRule {
        HeaderRule {
            name: name.to_string(),
            kind,
        }
    }

    #[test]
    fn defaults() {
        let s = Settings::default();
        assert!(s.proxy_protocol && s.hash_ids && !s.annotations);
        assert!(s.trusted_peers.is_empty() && s.headers.is_empty() && s.id_key_file.is_none());
        assert_eq!(s.precedence, SourceKind::DEFAULT_PRECEDENCE);
        assert_eq!(s.validate(), Ok(()));
        assert!(s.captures());
        assert_eq!(parse("[attribution]\n"), s);
    }

    #[test]
    fn full_example_parses_and_validates() {
        let s = parse(
            r#"
            [attribution]
            trusted_peers = ["10.0.0.0/8", "fd00::/8"]
            proxy_protocol = true
            hash_ids = true
            id_key_file = "/etc/outflow/id.key"
            annotations = false
            precedence = ["annotation", "header", "proxy", "peer"]
            [[attribution.headers]]
            name = "X-Forwarded-For"
            kind = "address"
            [[attribution.headers]]
            name = "x-client-id"
            kind = "id"
            "#,
        );
        assert_eq!(s.trusted_peers.len(), 2);
        assert_eq!(s.headers[0], rule("x-forwarded-for", HeaderKind::Address));
        assert_eq!(s.headers[1], rule("x-client-id", HeaderKind::Id));
        assert_eq!(s.validate(), Ok(()));
    }

    #[test]
    fn unknown_fields_are_rejected() {
        #[derive(Debug, Deserialize)]
        #[expect(dead_code, reason = "only the error matters")]
        struct File {
            attribution: Settings,
        }
        for text in [
            "[attribution]\ntrusted_peer = []\n",
            "[attribution]\n[[attribution.headers]]\nname = \"a\"\nkind = \"id\"\nextra = 1\n",
            "[attribution]\n[[attribution.headers]]\nname = \"a\"\nkind = \"cookie\"\n",
            "[attribution]\nprecedence = [\"gateway\"]\n",
        ] {
            assert!(toml::from_str::<File>(text).is_err(), "{text:?} parsed");
        }
    }

    #[test]
    fn validate_names_the_field() {
        let key = Some(PathBuf::from("/k"));
        let cases: Vec<(Settings, &str)> = vec![
            (
                Settings {
                    headers: vec![
                        rule("a", HeaderKind::Address),
                        rule("b", HeaderKind::Address),
                        rule("x y", HeaderKind::Address),
                    ],
                    ..Settings::default()
                },
                "attribution.headers[2].name: not a valid header name (\"x y\")",
            ),
            (
                Settings {
                    headers: vec![rule("", HeaderKind::Address)],
                    ..Settings::default()
                },
                "attribution.headers[0].name: not a valid header name (\"\")",
            ),
            (
                Settings {
                    headers: vec![rule(&"a".repeat(65), HeaderKind::Address)],
                    ..Settings::default()
                },
                "attribution.headers[0].name: not a valid header name",
            ),
            (
                Settings {
                    headers: vec![rule("x-é", HeaderKind::Address)],
                    ..Settings::default()
                },
                "attribution.headers[0].name: not a valid header name",
            ),
            (
                Settings {
                    headers: vec![
                        rule("x-a", HeaderKind::Address),
                        rule("X-A", HeaderKind::Address),
                    ],
                    ..Settings::default()
                },
                "attribution.headers[1].name: \"X-A\" is already configured in attribution.headers[0]",
            ),
            (
                Settings {
                    headers: (0..17)
                        .map(|i| rule(&format!("h{i}"), HeaderKind::Address))
                        .collect(),
                    ..Settings::default()
                },
                "attribution.headers: at most 16 rules (got 17)",
            ),
            (
                Settings {
                    precedence: vec![SourceKind::Header, SourceKind::Peer],
                    ..Settings::default()
                },
                "attribution.precedence: must list each of annotation, header, proxy, peer once",
            ),
            (
                Settings {
                    precedence: vec![
                        SourceKind::Header,
                        SourceKind::Header,
                        SourceKind::Proxy,
                        SourceKind::Peer,
                    ],
                    ..Settings::default()
                },
                "attribution.precedence: must list each of annotation, header, proxy, peer once",
            ),
            (
                Settings {
                    headers: vec![rule("x-client-id", HeaderKind::Id)],
                    ..Settings::default()
                },
                "attribution.id_key_file: required when hash_ids is true and ids can occur",
            ),
            (
                Settings {
                    annotations: true,
                    ..Settings::default()
                },
                "attribution.id_key_file: required when hash_ids is true",
            ),
            (
                Settings {
                    trusted_peers: vec!["10.0.0.0/8".parse().unwrap(); MAX_TRUSTED_PEERS + 1],
                    ..Settings::default()
                },
                "attribution.trusted_peers: at most 1024 networks",
            ),
        ];
        for (settings, want) in cases {
            let got = settings.validate().expect_err(want).to_string();
            assert!(got.starts_with(want), "got {got:?}, want {want:?}");
        }
        let ok = [
            Settings {
                headers: vec![rule("x-client-id", HeaderKind::Id)],
                id_key_file: key.clone(),
                ..Settings::default()
            },
            Settings {
                headers: vec![rule("x-client-id", HeaderKind::Id)],
                hash_ids: false,
                ..Settings::default()
            },
            Settings {
                annotations: true,
                id_key_file: key,
                ..Settings::default()
            },
            Settings {
                headers: (0..16)
                    .map(|i| rule(&format!("h{i}"), HeaderKind::Address))
                    .collect(),
                ..Settings::default()
            },
            Settings {
                headers: vec![rule(&"!#$%&'*+-.^_`|~09az".repeat(3), HeaderKind::Address)],
                precedence: vec![
                    SourceKind::Peer,
                    SourceKind::Proxy,
                    SourceKind::Header,
                    SourceKind::Annotation,
                ],
                ..Settings::default()
            },
        ];
        for settings in ok {
            assert_eq!(settings.validate(), Ok(()), "{settings:?}");
        }
    }

    #[test]
    fn captures_only_when_something_is_looked_for() {
        let none = Settings {
            proxy_protocol: false,
            annotations: true,
            hash_ids: false,
            ..Settings::default()
        };
        assert!(!none.captures());
        let headers = Settings {
            proxy_protocol: false,
            headers: vec![rule("x-real-ip", HeaderKind::Address)],
            ..Settings::default()
        };
        assert!(headers.captures());
    }
}
