//! Merging the aggregators' answers: pure functions, so that exactness is tested without a
//! cluster.
//!
//! TopTalkers is TPUT (Pei Cao and Zhe Wang, "Efficient top-K query calculation in distributed
//! networks", PODC 2004), on `m` aggregators:
//! 1. each sends its own top k; the k-th largest of the partial sums, `tau`, is at most the
//!    true k-th total (partial sums never exceed totals);
//! 2. each sends every key with at least `ceil(tau / m)`: a key held by none with that much
//!    totals less than `tau` (each share is below `tau / m`), so it is not in the top k;
//! 3. of those, the keys whose upper bound (what was sent, plus just under `ceil(tau / m)` for
//!    each aggregator that did not send it) reaches the k-th largest lower bound are fetched
//!    whole (every window's totals and the hosts by name) from every aggregator, and ranked.
use std::collections::{BTreeMap, HashMap};

use outflow_proto::v1;

use crate::window::{Totals, Window, WindowStats};

/// What one aggregator's store holds: its name, the partitions, and those of them it is still
/// replaying (`outflow.v1.EndResponse`).
pub type Held<'a> = (&'a str, &'a [u32], &'a [u32]);

/// Checks that `held` covers each of `partitions` exactly once, with none still being
/// replayed; else says which are missing, doubled or replayed.
pub fn coverage(partitions: u32, held: &[Held<'_>]) -> Result<(), String> {
    let mut holder: BTreeMap<u32, &str> = BTreeMap::new();
    let mut twice = Vec::new();
    for (name, ps, _) in held {
        for &p in *ps {
            if p >= partitions {
                continue;
            }
            if let Some(other) = holder.insert(p, name) {
                twice.push(format!("{p} ({other} and {name})"));
            }
        }
    }
    if !twice.is_empty() {
        return Err(format!(
            "partitions held by two aggregators at once (moving between them): {}; the answer would count them twice: try again in a moment",
            some(&twice)
        ));
    }
    let missing: Vec<String> = (0..partitions)
        .filter(|p| !holder.contains_key(p))
        .map(|p| p.to_string())
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "partitions {} of {partitions} are held by no live aggregator: their clients would be missing from the answer; try again once the aggregators have taken them over (within cluster.lease), or start one",
            some(&missing)
        ));
    }
    let replaying: Vec<String> = held
        .iter()
        .flat_map(|(name, _, ps)| {
            ps.iter()
                .filter(|p| **p < partitions)
                .map(move |p| format!("{p} ({name})"))
        })
        .collect();
    if !replaying.is_empty() {
        return Err(format!(
            "partitions {} are being replayed from the stream (after a rebuild, a move or a restart): the answer would lack part of their clients' bytes; try again once they have caught up (outflow_collector_cluster_partitions_replaying 0 on every aggregator)",
            some(&replaying)
        ));
    }
    Ok(())
}

/// The first ten of `items`, and how many more.
fn some(items: &[String]) -> String {
    let head = items
        .iter()
        .take(10)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    match items.len() {
        n if n > 10 => format!("{head} and {} more", n - 10),
        _ => head,
    }
}

/// Round 1: the k-th largest sum of what the aggregators' top lists say of each key (0 if
/// fewer than `k` keys were named).
pub fn threshold(first: &[v1::PartialTopResponse], k: usize) -> u64 {
    let mut sums: HashMap<&str, u64> = HashMap::new();
    for a in first {
        for kb in &a.keys {
            let s = sums.entry(kb.key.as_str()).or_default();
            *s = s.saturating_add(kb.response_bytes);
        }
    }
    let mut v: Vec<u64> = sums.into_values().collect();
    if k == 0 || v.len() < k {
        return 0;
    }
    v.sort_unstable_by(|a, b| b.cmp(a));
    v[k - 1]
}

/// Round 2: the keys that may be in the top `k`, from what each of `m` aggregators sent of
/// its keys with at least `min` bytes.
pub fn candidates(second: &[v1::PartialTopResponse], m: u64, min: u64, k: usize) -> Vec<String> {
    // Per key: the bytes sent, and by how many aggregators.
    let mut known: HashMap<&str, (u64, u64)> = HashMap::new();
    for a in second {
        for kb in &a.keys {
            let e = known.entry(kb.key.as_str()).or_default();
            e.0 = e.0.saturating_add(kb.response_bytes);
            e.1 += 1;
        }
    }
    let mut lower: Vec<u64> = known.values().map(|(b, _)| *b).collect();
    lower.sort_unstable_by(|a, b| b.cmp(a));
    let floor = if k > 0 && lower.len() >= k {
        lower[k - 1]
    } else {
        0
    };
    // An aggregator that did not send a key holds less than `min` of it.
    let unsent = min.saturating_sub(1);
    let mut keys: Vec<String> = known
        .into_iter()
        .filter(|(_, (b, n))| {
            b.saturating_add(m.saturating_sub(*n).saturating_mul(unsent)) >= floor
        })
        .map(|(k, _)| k.to_owned())
        .collect();
    keys.sort_unstable();
    keys
}

/// A key's totals over every aggregator: per window, and its hosts with when each last
/// served it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyTotals {
    pub windows: [Totals; 4],
    pub hosts: BTreeMap<String, u64>,
}

impl KeyTotals {
    /// The key's stats in window `w` ending at `end_ms`.
    pub fn stats(&self, w: Window, end_ms: u64) -> WindowStats {
        let start = w.start_ms(end_ms);
        let hosts = self.hosts.values().filter(|t| **t >= start).count();
        WindowStats {
            totals: self.windows[w.index()],
            hosts: u32::try_from(hosts).unwrap_or(u32::MAX),
        }
    }
}

fn window_index(w: i32) -> Option<usize> {
    let w: Window = v1::Window::try_from(w).ok()?.try_into().ok()?;
    Some(w.index())
}

/// Round 3: every aggregator's answer of the keys, summed (hosts as a union).
pub fn key_totals(answers: Vec<v1::PartialKeysResponse>) -> BTreeMap<String, KeyTotals> {
    let mut out: BTreeMap<String, KeyTotals> = BTreeMap::new();
    for a in answers {
        for kw in a.keys {
            let t = out.entry(kw.key).or_default();
            for w in kw.windows {
                if let Some(i) = window_index(w.window) {
                    t.windows[i].add(&Totals {
                        response_bytes: w.response_bytes,
                        request_bytes: w.request_bytes,
                        connections_closed: w.connections_closed,
                    });
                }
            }
            for h in kw.hosts {
                let last = t.hosts.entry(h.name).or_default();
                *last = (*last).max(h.last_seen_ms);
            }
        }
    }
    out
}

/// The `k` keys with the most response bytes in `w` (then request bytes, closes, the smaller
/// key), those not seen in it left out.
pub fn rank(
    totals: &BTreeMap<String, KeyTotals>,
    w: Window,
    end_ms: u64,
    k: usize,
) -> Vec<v1::Talker> {
    let mut rows: Vec<(&String, WindowStats)> = totals
        .iter()
        .map(|(key, t)| (key, t.stats(w, end_ms)))
        .filter(|(_, s)| s.hosts > 0)
        .collect();
    let rank = |s: &WindowStats| {
        let t = s.totals;
        (t.response_bytes, t.request_bytes, t.connections_closed)
    };
    rows.sort_by(|a, b| rank(&b.1).cmp(&rank(&a.1)).then_with(|| a.0.cmp(b.0)));
    rows.truncate(k);
    rows.into_iter()
        .map(|(key, s)| v1::Talker {
            key: key.clone(),
            response_bytes: s.totals.response_bytes,
            request_bytes: s.totals.request_bytes,
            connections_closed: s.totals.connections_closed,
            hosts: s.hosts,
        })
        .collect()
}

fn is_open(a: &v1::Alert) -> bool {
    a.state == v1::AlertState::Open as i32
}

/// The aggregators' alerts as one list: one per id (the latest judgement of it, an open one
/// before a resolved one of the same time), open first (newest judgement first, then more
/// bytes), then resolved (newest first); at most `limit`.
pub fn alerts(all: impl IntoIterator<Item = v1::Alert>, limit: usize) -> Vec<v1::Alert> {
    let mut by_id: BTreeMap<String, v1::Alert> = BTreeMap::new();
    for a in all {
        match by_id.get(&a.id) {
            Some(b) if (b.last_seen_ms, is_open(b)) >= (a.last_seen_ms, is_open(&a)) => {}
            _ => {
                by_id.insert(a.id.clone(), a);
            }
        }
    }
    let (mut open, mut resolved): (Vec<_>, Vec<_>) = by_id.into_values().partition(is_open);
    open.sort_by(|a, b| {
        b.last_seen_ms
            .cmp(&a.last_seen_ms)
            .then(b.observed_bytes.cmp(&a.observed_bytes))
            .then(a.id.cmp(&b.id))
    });
    resolved.sort_by(|a, b| b.last_seen_ms.cmp(&a.last_seen_ms).then(a.id.cmp(&b.id)));
    open.extend(resolved);
    open.truncate(limit);
    open
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    const END: u64 = 1_750_000_000_000;

    fn names(rows: &[v1::Talker]) -> BTreeSet<&str> {
        rows.iter().map(|t| t.key.as_str()).collect()
    }

    /// One aggregator's keys: name → (response, request, closed, hosts as (name, last seen)).
    type Row = (u64, u64, u64, Vec<(String, u64)>);
    type Node = BTreeMap<String, Row>;

    fn seen(v: &Row) -> bool {
        v.3.iter().any(|(_, t)| *t >= Window::H1.start_ms(END))
    }

    /// What an aggregator answers to Top (the window is H1; every slot is in it).
    fn top(node: &Node, limit: usize, min: u64) -> v1::PartialTopResponse {
        let mut rows: Vec<(&String, &Row)> = node.iter().filter(|(_, v)| seen(v)).collect();
        let keys = if limit > 0 {
            rows.sort_by(|a, b| {
                (b.1.0, b.1.1, b.1.2)
                    .cmp(&(a.1.0, a.1.1, a.1.2))
                    .then(a.0.cmp(b.0))
            });
            rows.truncate(limit);
            rows
        } else {
            rows.into_iter().filter(|(_, v)| v.0 >= min).collect()
        };
        v1::PartialTopResponse {
            keys: keys
                .into_iter()
                .map(|(k, v)| v1::KeyBytes {
                    key: k.clone(),
                    response_bytes: v.0,
                })
                .collect(),
        }
    }

    fn keys(node: &Node, wanted: &[String]) -> v1::PartialKeysResponse {
        v1::PartialKeysResponse {
            keys: wanted
                .iter()
                .filter_map(|k| {
                    let v = node.get(k)?;
                    Some(v1::KeyWindows {
                        key: k.clone(),
                        windows: vec![v1::WindowStats {
                            window: v1::Window::Window1h as i32,
                            response_bytes: v.0,
                            request_bytes: v.1,
                            connections_closed: v.2,
                            hosts: 0,
                        }],
                        hosts: v
                            .3
                            .iter()
                            .map(|(name, t)| v1::HostSeen {
                                name: name.clone(),
                                last_seen_ms: *t,
                            })
                            .collect(),
                    })
                })
                .collect(),
        }
    }

    /// The three rounds over `nodes`.
    fn tput(nodes: &[Node], k: usize) -> Vec<v1::Talker> {
        let first: Vec<_> = nodes.iter().map(|n| top(n, k, 0)).collect();
        let tau = threshold(&first, k);
        let m = nodes.len() as u64;
        let min = tau.div_ceil(m);
        let second: Vec<_> = nodes.iter().map(|n| top(n, 0, min)).collect();
        let c = candidates(&second, m, min, k);
        let totals = key_totals(nodes.iter().map(|n| keys(n, &c)).collect());
        rank(&totals, Window::H1, END, k)
    }

    /// Every key of every node summed, ranked.
    fn brute(nodes: &[Node], k: usize) -> Vec<v1::Talker> {
        let all: BTreeSet<String> = nodes.iter().flat_map(|n| n.keys().cloned()).collect();
        let all: Vec<String> = all.into_iter().collect();
        let totals = key_totals(nodes.iter().map(|n| keys(n, &all)).collect());
        rank(&totals, Window::H1, END, k)
    }

    fn node() -> impl Strategy<Value = Node> {
        let host = (
            0u8..4,
            prop_oneof![Just(END - 10_000), Just(END - 7_200_000)],
        )
            .prop_map(|(h, t)| (format!("host-{h}"), t));
        prop::collection::btree_map(
            (0u8..40).prop_map(|k| format!("k{k}")),
            (
                prop_oneof![0u64..5, 0u64..1_000, Just(500u64)],
                0u64..3,
                0u64..2,
                prop::collection::vec(host, 1..3),
            )
                // A key with bytes in the window was served in it.
                .prop_map(|r| if seen(&r) { r } else { (0, 0, 0, r.3) }),
            0..25,
        )
    }

    proptest! {
        /// TPUT's answer is the brute-force answer: the same keys, totals and host counts, in
        /// the same order.
        #[test]
        fn tput_is_exact(nodes in prop::collection::vec(node(), 1..5), k in 1usize..12) {
            prop_assert_eq!(tput(&nodes, k), brute(&nodes, k));
        }
    }

    #[test]
    fn a_key_spread_thin_over_aggregators_is_found() {
        // "spread" is 30 on each of three aggregators (90 in all) and in nobody's top 1.
        let mk = |rows: &[(&str, u64)]| -> Node {
            rows.iter()
                .map(|(k, b)| ((*k).to_owned(), (*b, 0, 0, vec![("h".to_owned(), END)])))
                .collect()
        };
        let nodes = [
            mk(&[("a", 40), ("spread", 30)]),
            mk(&[("b", 41), ("spread", 30)]),
            mk(&[("c", 42), ("spread", 30)]),
        ];
        let top1 = tput(&nodes, 1);
        assert_eq!(names(&top1), BTreeSet::from(["spread"]));
        assert_eq!(top1[0].response_bytes, 90);
    }

    #[test]
    fn coverage_names_what_is_missing_or_doubled() {
        assert!(coverage(4, &[("a", &[0, 1], &[]), ("b", &[2, 3], &[])]).is_ok());
        let e = coverage(4, &[("a", &[0, 1], &[]), ("b", &[3], &[])]).unwrap_err();
        assert!(
            e.starts_with("partitions 2 of 4 are held by no live aggregator"),
            "{e}"
        );
        let e = coverage(4, &[("a", &[0, 1, 2], &[]), ("b", &[2, 3], &[])]).unwrap_err();
        assert!(e.contains("2 (a and b)"), "{e}");
        let many: Vec<u32> = Vec::new();
        let e = coverage(12, &[("a", &many, &[])]).unwrap_err();
        assert!(e.contains("9 and 2 more"), "{e}");
        // Held once each, but some still being replayed: refused, naming them.
        let e = coverage(4, &[("a", &[0, 1], &[1]), ("b", &[2, 3], &[3])]).unwrap_err();
        assert!(
            e.starts_with("partitions 1 (a), 3 (b) are being replayed from the stream"),
            "{e}"
        );
    }

    #[test]
    fn alerts_merge_once_per_id_open_first() {
        let a = |id: &str, open: bool, last: u64| v1::Alert {
            id: id.into(),
            state: if open {
                v1::AlertState::Open
            } else {
                v1::AlertState::Resolved
            } as i32,
            last_seen_ms: last,
            ..Default::default()
        };
        let merged = alerts(
            [
                a("x", true, 5),
                a("y", false, 9),
                a("x", true, 7),
                a("z", true, 6),
                a("w", false, 3),
            ],
            3,
        );
        let got: Vec<(&str, u64)> = merged
            .iter()
            .map(|a| (a.id.as_str(), a.last_seen_ms))
            .collect();
        assert_eq!(got, [("x", 7), ("z", 6), ("y", 9)]);
    }
}
