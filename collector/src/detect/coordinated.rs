//! **Coordinated**: a prefix whose members are each under the per-client limit but together
//! far over it, active in the same hours.
use serde::{Deserialize, Serialize};

use super::{
    HOUR_MS,
    allowlist::AllowlistConfig,
    finding::{Finding, Severity, human},
    judged::{GroupStats, Judged},
};
use crate::{
    aggregate::{Map, State},
    config_error::{ConfigError, invalid},
    window::Window,
};

/// Members of one group: address → last batch time seen.
pub type Members = Map<std::net::IpAddr, u64>;

/// `[detect.coordinated]`: a prefix spread over many addresses.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CoordinatedConfig {
    pub enabled: bool,
    /// A /24's or /64's 1 h total must be this many times `volume.client_per_hour`.
    pub factor: f64,
    /// Distinct member addresses active in the last hour.
    pub min_members: u64,
    /// Mean Jaccard similarity of members' active hours with the group's (0..=1).
    pub min_synchrony: f64,
    /// Wider prefixes the detector aggregates (IPv4 /8 to /23, IPv6 /16 to /63), each with its
    /// own factor: a wider block holds more unrelated clients.
    pub ipv4_wide: Vec<WidePrefix>,
    pub ipv6_wide: Vec<WidePrefix>,
}

/// A wider prefix length judged as a group, and its `factor`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WidePrefix {
    pub prefix_len: u8,
    pub factor: f64,
}

impl Default for CoordinatedConfig {
    fn default() -> Self {
        let w = |prefix_len, factor| WidePrefix { prefix_len, factor };
        Self {
            enabled: true,
            factor: 4.0,
            min_members: 8,
            min_synchrony: 0.5,
            ipv4_wide: vec![w(20, 8.0), w(16, 16.0)],
            ipv6_wide: vec![w(48, 4.0), w(40, 8.0), w(32, 16.0)],
        }
    }
}

impl CoordinatedConfig {
    /// Checks the values; the error names the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let check =
            |field: &'static str, list: &[WidePrefix], lens: std::ops::RangeInclusive<u8>| {
                for w in list {
                    if !lens.contains(&w.prefix_len) {
                        return Err(invalid(
                            field,
                            format!("prefix_len {} is not in {lens:?}", w.prefix_len),
                        ));
                    }
                    if !(w.factor.is_finite() && w.factor > 0.0) {
                        return Err(invalid(
                            field,
                            format!("factor {} must be a positive number", w.factor),
                        ));
                    }
                }
                Ok(())
            };
        check("detect.coordinated.ipv4_wide", &self.ipv4_wide, 8..=23)?;
        check("detect.coordinated.ipv6_wide", &self.ipv6_wide, 16..=63)
    }

    /// The factor of a group of prefix length `len` (`wide`: one the detector aggregates).
    pub fn factor_of(&self, wide: Option<ipnet::IpNet>) -> f64 {
        let Some(n) = wide else {
            return self.factor;
        };
        let list = match n {
            ipnet::IpNet::V4(_) => &self.ipv4_wide,
            ipnet::IpNet::V6(_) => &self.ipv6_wide,
        };
        list.iter()
            .find(|w| w.prefix_len == n.prefix_len())
            .map_or(self.factor, |w| w.factor)
    }

    /// The wide prefixes `addr` falls in.
    pub fn wide_of(&self, addr: std::net::IpAddr) -> impl Iterator<Item = ipnet::IpNet> + '_ {
        let list = if addr.is_ipv4() {
            &self.ipv4_wide
        } else {
            &self.ipv6_wide
        };
        list.iter()
            .filter_map(move |w| super::subject::wide_of(addr, w.prefix_len))
    }
}

/// The members' statistics at `end_ms` (allowlisted members only add to the allowed bytes).
pub fn member_stats(
    allow: &AllowlistConfig,
    st: &State,
    members: Option<&Members>,
    end_ms: u64,
) -> GroupStats {
    let mut g = GroupStats::default();
    let Some(members) = members else { return g };
    let h1_start = Window::H1.start_ms(end_ms);
    let cur_hour = end_ms / HOUR_MS;
    let mut masks: Vec<u32> = Vec::new();
    for (addr, last) in members {
        let Some(r) = st.client(*addr).merged() else {
            continue;
        };
        if allow.covers(*addr) {
            g.allowed_h1 += r.window(Window::H1, end_ms).totals.response_bytes;
            g.allowed_d1 += r.window(Window::H24, end_ms).totals.response_bytes;
            continue;
        }
        let d1 = r.window(Window::H24, end_ms).totals.response_bytes;
        g.max_member_d1 = g.max_member_d1.max(d1);
        if *last < h1_start {
            continue;
        }
        let resp = r.window(Window::H1, end_ms).totals.response_bytes;
        if resp == 0 {
            continue;
        }
        g.active += 1;
        g.max_member = g.max_member.max(resp);
        let mut mask = 0u32;
        for (h, t) in r.hourly() {
            if h <= cur_hour && h + 24 > cur_hour && t.response_bytes > 0 {
                mask |= 1 << (cur_hour - h);
            }
        }
        masks.push(mask);
    }
    g.synchrony = synchrony(&masks);
    g
}

/// Mean Jaccard similarity of each mask (bit i: active i hours ago) with the hours in which at
/// least half of the masks are active; 0 for none.
pub fn synchrony(masks: &[u32]) -> f64 {
    if masks.is_empty() {
        return 0.0;
    }
    let mut group = 0u32;
    for bit in 0..32 {
        let n = masks.iter().filter(|m| *m & (1 << bit) != 0).count();
        if n * 2 >= masks.len() {
            group |= 1 << bit;
        }
    }
    let sum: f64 = masks
        .iter()
        .map(|m| {
            let union = (m | group).count_ones();
            if union == 0 {
                0.0
            } else {
                f64::from((m & group).count_ones()) / f64::from(union)
            }
        })
        .sum();
    sum / masks.len() as f64
}

/// The finding, if the group's 1 h total is `factor` (of its prefix length) × the per-client
/// limit with no member over it, enough members, in step.
pub fn judge(cfg: &CoordinatedConfig, client_per_hour: u64, j: &Judged<'_>) -> Option<Finding> {
    let g = j.group.as_ref()?;
    let wide = match j.subject {
        super::subject::Subject::Wide(n) => Some(*n),
        _ => None,
    };
    let thr = (cfg.factor_of(wide) * client_per_hour as f64) as u64;
    let holds = client_per_hour > 0
        && j.h1_resp >= thr
        && g.max_member < client_per_hour
        && g.active >= cfg.min_members
        && g.synchrony >= cfg.min_synchrony;
    if !holds {
        return None;
    }
    let via = j.via(Window::H1);
    Some(Finding {
        severity: Severity::of_group(j.h1_resp, thr),
        window_seconds: 3600,
        observed_bytes: j.h1_resp,
        baseline_bytes: g.max_member,
        threshold_bytes: thr,
        request_bytes: j.h1.totals.request_bytes,
        hosts: j.hosts(Window::H1),
        members: g.active,
        summary: format!(
            "{}: {} addresses pulled {} of responses in the last hour, none over the {} per-address limit (largest {}), active in the same hours — likely one client spread over many addresses; consider rate-limiting the prefix.",
            j.title(&via),
            g.active,
            human(j.h1_resp),
            human(client_per_hour),
            human(g.max_member),
        ),
        via,
    })
}
