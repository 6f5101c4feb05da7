//! One subject at one batch time: the window sums and member statistics every detector reads.
use super::{
    days::DayWindow,
    finding::Via,
    subject::{Named, Subject},
};
use crate::{
    aggregate::State,
    keys::HostId,
    window::{Rollup, Window, WindowStats},
};

/// The members of a group subject (a prefix) in the judged windows.
#[derive(Debug, Clone, Default)]
pub struct GroupStats {
    /// Members with response bytes in the 1 h window.
    pub active: u64,
    /// The largest member's response bytes in the 1 h and the 24 h window.
    pub max_member: u64,
    pub max_member_d1: u64,
    /// Response bytes of allowlisted members in the 1 h and the 24 h window.
    pub allowed_h1: u64,
    pub allowed_d1: u64,
    /// Mean Jaccard similarity of the active members' active hours with the group's (0..=1).
    pub synchrony: f64,
}

/// What every detector reads about one subject at one batch time.
pub struct Judged<'a> {
    pub st: &'a State,
    pub subject: &'a Subject,
    pub rollup: &'a Rollup,
    pub end_ms: u64,
    pub h1: WindowStats,
    pub d1: WindowStats,
    /// Response bytes in the 1 h and 24 h windows (a prefix's without allowlisted members).
    pub h1_resp: u64,
    pub d1_resp: u64,
    /// For a prefix, its members.
    pub group: Option<GroupStats>,
    /// `[detect] dominant_member_share`.
    pub dominant_share: f64,
    /// The 7-day and 30-day windows (a prefix's with its allowlisted members' bytes).
    pub d7: DayWindow,
    pub d30: DayWindow,
}

impl<'a> Judged<'a> {
    pub fn new(
        st: &'a State,
        subject: &'a Subject,
        rollup: &'a Rollup,
        end_ms: u64,
        group: Option<GroupStats>,
        dominant_share: f64,
        (d7, d30): (DayWindow, DayWindow),
    ) -> Self {
        let h1 = rollup.window(Window::H1, end_ms);
        let d1 = rollup.window(Window::H24, end_ms);
        let (h1_resp, d1_resp) = match &group {
            Some(g) => (
                h1.totals.response_bytes.saturating_sub(g.allowed_h1),
                d1.totals.response_bytes.saturating_sub(g.allowed_d1),
            ),
            None => (h1.totals.response_bytes, d1.totals.response_bytes),
        };
        Judged {
            st,
            subject,
            rollup,
            end_ms,
            h1,
            d1,
            h1_resp,
            d1_resp,
            group,
            dominant_share,
            d7,
            d30,
        }
    }

    /// Hosts that served the subject in `w`.
    pub fn hosts(&self, w: Window) -> Vec<HostId> {
        self.rollup.hosts_since(w.start_ms(self.end_ms)).collect()
    }

    /// Addresses and gateways of the subject in `w`.
    pub fn via(&self, w: Window) -> Via {
        Via::of(self.rollup, w.start_ms(self.end_ms))
    }

    /// How summaries name the subject: `203.0.113.7`, `h:... (from 3 addresses: ...)`.
    pub fn title(&self, via: &Via) -> String {
        format!("{}{via}", Named(self.subject, self.st))
    }

    /// Distinct active member addresses of a prefix (0 for other subjects).
    pub fn members(&self) -> u64 {
        self.group.as_ref().map_or(0, |g| g.active)
    }

    /// Whether one member makes the prefix's bytes in `w`: its own alert covers the prefix.
    pub fn dominated(&self, w: Window) -> bool {
        let share = self.dominant_share;
        self.group.as_ref().is_some_and(|g| {
            let (max, total) = match w {
                Window::H24 => (g.max_member_d1, self.d1_resp),
                _ => (g.max_member, self.h1_resp),
            };
            total > 0 && max as f64 >= share * total as f64
        })
    }
}
