//! The hop lists of address headers: who forwarded a request, oldest first.
//!
//! The syntax is picked by the header's name:
//! - `forwarded` (RFC 7239): comma-separated elements, the `for=` parameter of each, quoted or
//!   not; `unknown`, obfuscated identifiers (`_hidden`) and elements without `for=` are hops that
//!   are not addresses.
//! - `x-real-ip`, `x-envoy-external-address`: one address per header line.
//! - any other (`x-forwarded-for`, `true-client-ip`, ...): a comma-separated list like
//!   `X-Forwarded-For`.
//!
//! An address may carry a port (`192.0.2.1:5678`, `[2001:db8::1]:80`); blanks around list
//! elements and empty elements are ignored; several lines of the header are one list, in order.
//! A list keeps its right-most [`MAX_HOPS`] hops: the walk reads from the right, and stops early
//! anyway on a list that long.
use std::{
    collections::VecDeque,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use crate::trust::normalize;

/// At most this many hops are kept (the right-most ones).
pub const MAX_HOPS: usize = 64;

/// How a header lists its hops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Syntax {
    /// Comma-separated addresses (`X-Forwarded-For`).
    List,
    /// One address per line (`X-Real-IP`, `x-envoy-external-address`).
    Single,
    /// RFC 7239 `Forwarded`.
    Forwarded,
}

impl Syntax {
    /// The syntax of the header `name` (any case).
    pub fn for_header(name: &str) -> Self {
        if name.eq_ignore_ascii_case("forwarded") {
            Syntax::Forwarded
        } else if name.eq_ignore_ascii_case("x-real-ip")
            || name.eq_ignore_ascii_case("x-envoy-external-address")
        {
            Syntax::Single
        } else {
            Syntax::List
        }
    }
}

/// The hops of all lines (`values`, in order) of the header `name`: oldest first, `None` for a
/// hop that is not an address, IPv4-mapped addresses normalised, at most [`MAX_HOPS`].
pub fn hops<'a>(name: &str, values: impl IntoIterator<Item = &'a [u8]>) -> Vec<Option<IpAddr>> {
    let syntax = Syntax::for_header(name);
    let mut out = VecDeque::with_capacity(MAX_HOPS);
    let mut push = |hop: Option<IpAddr>| {
        if out.len() == MAX_HOPS {
            out.pop_front();
        }
        out.push_back(hop.map(normalize));
    };
    for value in values {
        match syntax {
            Syntax::Single => {
                let v = trim_ows(value);
                if !v.is_empty() {
                    push(node(v));
                }
            }
            Syntax::List => {
                for element in value.split(|&b| b == b',') {
                    let e = trim_ows(element);
                    if !e.is_empty() {
                        push(node(e));
                    }
                }
            }
            Syntax::Forwarded => split_unquoted(value, b',', |element| {
                if !trim_ows(element).is_empty() {
                    push(forwarded_for(element));
                }
            }),
        }
    }
    out.into()
}

fn trim_ows(s: &[u8]) -> &[u8] {
    let start = s
        .iter()
        .position(|&b| b != b' ' && b != b'\t')
        .unwrap_or(s.len());
    let end = s
        .iter()
        .rposition(|&b| b != b' ' && b != b'\t')
        .map_or(start, |i| i + 1);
    &s[start..end.max(start)]
}

/// Calls `f` on each part of `s` between `sep`s that are not inside a quoted string.
fn split_unquoted(s: &[u8], sep: u8, mut f: impl FnMut(&[u8])) {
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, &b) in s.iter().enumerate() {
        if escaped {
            escaped = false;
        } else if quoted && b == b'\\' {
            escaped = true;
        } else if b == b'"' {
            quoted = !quoted;
        } else if b == sep && !quoted {
            f(&s[start..i]);
            start = i + 1;
        }
    }
    f(&s[start..]);
}

/// The address in the `for=` parameter of one `Forwarded` element.
fn forwarded_for(element: &[u8]) -> Option<IpAddr> {
    let mut found: Option<Option<IpAddr>> = None;
    let mut duplicate = false;
    split_unquoted(element, b';', |pair| {
        let pair = trim_ows(pair);
        let Some(eq) = pair.iter().position(|&b| b == b'=') else {
            return;
        };
        if !trim_ows(&pair[..eq]).eq_ignore_ascii_case(b"for") {
            return;
        }
        duplicate |= found.is_some();
        found = Some(unquote(trim_ows(&pair[eq + 1..])).and_then(|v| node(&v)));
    });
    if duplicate { None } else { found.flatten() }
}

/// A token as is, a quoted string without its quotes and escapes; `None` if a quote is unclosed.
fn unquote(v: &[u8]) -> Option<Vec<u8>> {
    let Some(inner) = v.strip_prefix(b"\"") else {
        return Some(v.to_vec());
    };
    let inner = inner.strip_suffix(b"\"")?;
    let mut out = Vec::with_capacity(inner.len());
    let mut escaped = false;
    for &b in inner {
        if escaped {
            out.push(b);
            escaped = false;
        } else if b == b'\\' {
            escaped = true;
        } else {
            out.push(b);
        }
    }
    if escaped { None } else { Some(out) }
}

/// One address with an optional port: `192.0.2.1`, `192.0.2.1:80`, `2001:db8::1`,
/// `[2001:db8::1]`, `[2001:db8::1]:80`; RFC 7239 obfuscated ports (`:_abc`) are allowed.
fn node(s: &[u8]) -> Option<IpAddr> {
    let s = std::str::from_utf8(s).ok()?;
    if let Some(rest) = s.strip_prefix('[') {
        let (addr, after) = rest.split_once(']')?;
        if !(after.is_empty() || after.strip_prefix(':').is_some_and(is_port)) {
            return None;
        }
        return addr.parse::<Ipv6Addr>().ok().map(IpAddr::V6);
    }
    match s.split_once(':') {
        Some((addr, port)) if !port.contains(':') => {
            if !is_port(port) {
                return None;
            }
            addr.parse::<Ipv4Addr>().ok().map(IpAddr::V4)
        }
        _ => s.parse::<IpAddr>().ok(),
    }
}

fn is_port(p: &str) -> bool {
    let digits = !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit());
    let obfuscated = p.len() > 1
        && p.starts_with('_')
        && p[1..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    (digits && p.parse::<u16>().is_ok()) || obfuscated
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn h(s: &str) -> Option<IpAddr> {
        if s == "?" {
            None
        } else {
            Some(s.parse().unwrap())
        }
    }

    fn check(name: &str, values: &[&str], want: &[&str]) {
        let got = hops(name, values.iter().map(|v| v.as_bytes()));
        let want: Vec<_> = want.iter().map(|s| h(s)).collect();
        assert_eq!(got, want, "{name}: {values:?}");
    }

    #[test]
    fn x_forwarded_for() {
        let cases: &[(&[&str], &[&str])] = &[
            (&[], &[]),
            (&[""], &[]),
            (&["203.0.113.7"], &["203.0.113.7"]),
            (&["203.0.113.7, 10.0.0.2"], &["203.0.113.7", "10.0.0.2"]),
            (&[" 203.0.113.7 ,\t10.0.0.2 "], &["203.0.113.7", "10.0.0.2"]),
            (&["203.0.113.7,,10.0.0.2,"], &["203.0.113.7", "10.0.0.2"]),
            (&["203.0.113.7:5678"], &["203.0.113.7"]),
            (
                &["[2001:db8::1]:80, 2001:db8::2, [2001:db8::3]"],
                &["2001:db8::1", "2001:db8::2", "2001:db8::3"],
            ),
            (&["::ffff:192.0.2.9"], &["192.0.2.9"]),
            (&["unknown, 192.0.2.1"], &["?", "192.0.2.1"]),
            (&["192.0.2.1:99999"], &["?"]),
            (&["192.0.2.1:"], &["?"]),
            (&["2001:db8::1:80:"], &["?"]),
            (&["[2001:db8::1"], &["?"]),
            (&["[192.0.2.1]"], &["?"]),
            (&["fe80::1%eth0"], &["?"]),
            (&["192.0.2.001"], &["?"]),
            (&["a.b.c.d, 1.2.3.4"], &["?", "1.2.3.4"]),
            (
                &["1.1.1.1", "2.2.2.2, 3.3.3.3"],
                &["1.1.1.1", "2.2.2.2", "3.3.3.3"],
            ),
            (&["\u{00e9}"], &["?"]),
        ];
        for (values, want) in cases {
            check("x-forwarded-for", values, want);
        }
        // Any other address header reads like X-Forwarded-For.
        check(
            "true-client-ip",
            &["1.1.1.1, 2.2.2.2"],
            &["1.1.1.1", "2.2.2.2"],
        );
    }

    #[test]
    fn single_address_headers() {
        for name in ["x-real-ip", "X-Envoy-External-Address"] {
            check(name, &["203.0.113.7"], &["203.0.113.7"]);
            check(name, &[" 203.0.113.7:443 "], &["203.0.113.7"]);
            check(name, &["203.0.113.7, 10.0.0.1"], &["?"]);
            check(name, &["1.1.1.1", "2.2.2.2"], &["1.1.1.1", "2.2.2.2"]);
            check(name, &[""], &[]);
        }
    }

    #[test]
    fn forwarded_rfc7239() {
        let cases: &[(&[&str], &[&str])] = &[
            (
                &["for=192.0.2.60;proto=http;by=203.0.113.43"],
                &["192.0.2.60"],
            ),
            (
                &["For=\"[2001:db8:cafe::17]:4711\""],
                &["2001:db8:cafe::17"],
            ),
            (
                &["for=192.0.2.43, for=198.51.100.17"],
                &["192.0.2.43", "198.51.100.17"],
            ),
            (
                &["for=192.0.2.43,for=\"[2001:db8:cafe::17]\", for=unknown"],
                &["192.0.2.43", "2001:db8:cafe::17", "?"],
            ),
            (&["for=_hidden, for=_SEVKISEK"], &["?", "?"]),
            (&["for=\"_gazonk\""], &["?"]),
            (&["for=\"192.0.2.43:_port\""], &["192.0.2.43"]),
            (&["proto=https;by=10.0.0.1"], &["?"]),
            (
                &["by=10.0.0.1;for=192.0.2.1;host=\"a,b;c\""],
                &["192.0.2.1"],
            ),
            (
                &["host=\"a,b\";for=192.0.2.1, for=192.0.2.2"],
                &["192.0.2.1", "192.0.2.2"],
            ),
            (&["for=\"192.0.2.1"], &["?"]),
            (&["for=\"19\\2.0.2.1\""], &["192.0.2.1"]),
            (&["for=192.0.2.1;for=192.0.2.2"], &["?"]),
            (&[" for = 192.0.2.1 "], &["192.0.2.1"]),
            (&["for=2001:db8::1"], &["2001:db8::1"]),
            (
                &["for=192.0.2.1", "for=192.0.2.2"],
                &["192.0.2.1", "192.0.2.2"],
            ),
            (&[", ,for=192.0.2.1,"], &["192.0.2.1"]),
            (&["garbage"], &["?"]),
        ];
        for (values, want) in cases {
            check("forwarded", values, want);
        }
    }

    #[test]
    fn keeps_the_rightmost_hops() {
        let list: Vec<String> = (0..100)
            .map(|i| format!("10.0.{}.{}", i / 256, i % 256))
            .collect();
        let value = list.join(",");
        let got = hops("x-forwarded-for", [value.as_bytes()]);
        assert_eq!(got.len(), MAX_HOPS);
        assert_eq!(got[0], h("10.0.0.36"));
        assert_eq!(got[MAX_HOPS - 1], h("10.0.0.99"));
    }

    #[test]
    fn syntax_by_name() {
        assert_eq!(Syntax::for_header("Forwarded"), Syntax::Forwarded);
        assert_eq!(Syntax::for_header("x-real-ip"), Syntax::Single);
        assert_eq!(
            Syntax::for_header("x-envoy-external-address"),
            Syntax::Single
        );
        assert_eq!(Syntax::for_header("x-forwarded-for"), Syntax::List);
        assert_eq!(Syntax::for_header("cf-connecting-ip"), Syntax::List);
    }

    proptest! {
        #[test]
        fn never_panics_and_bounded(values in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..4)) {
            for name in ["x-forwarded-for", "forwarded", "x-real-ip"] {
                let got = hops(name, values.iter().map(Vec::as_slice));
                prop_assert!(got.len() <= MAX_HOPS);
                prop_assert!(got.iter().flatten().all(|a| normalize(*a) == *a));
            }
        }

        #[test]
        fn xff_round_trips(addrs in proptest::collection::vec(any::<IpAddr>(), 0..80), ports in any::<bool>()) {
            let text: Vec<String> = addrs.iter().map(|a| match (a, ports) {
                (IpAddr::V6(_), true) => format!("[{a}]:443"),
                (IpAddr::V4(_), true) => format!("{a}:443"),
                _ => a.to_string(),
            }).collect();
            let value = text.join(", ");
            let got = hops("x-forwarded-for", [value.as_bytes()]);
            let want: Vec<_> = addrs.iter().rev().take(MAX_HOPS).rev().map(|a| Some(normalize(*a))).collect();
            prop_assert_eq!(got, want);
        }
    }
}
