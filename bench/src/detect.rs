//! The detectors' cost per judgement at 100k and 1M active clients, in process: the
//! collector's own `Detector` over a `State` of steady clients, each in a /24 of its own, so
//! that the cohort detector holds them as candidates (a share of them, or all: the worst
//! case). Times one judgement of every client (the first, which also learns) and the next
//! one a minute later, and the memory the detector holds (its RSS growth).
use std::{net::IpAddr, time::Instant};

use anyhow::Result;
use outflow_collector::{
    aggregate::State,
    detect::{DetectConfig, Detector, Subject},
    keys::Key,
    window::{Rollup, Totals},
};

use crate::{
    report::{Section, thousands},
    sys,
};

#[derive(clap::Args)]
pub struct Args {
    /// Active clients (comma-separated counts).
    #[arg(long, value_delimiter = ',', default_value = "100000,1000000")]
    clients: Vec<u32>,
    /// Shares of them that are steady enough to be cohort candidates, in % (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,100")]
    steady_percent: Vec<u32>,
}

/// A UTC midnight: batch time of the runs.
const T0: u64 = 1_767_571_200_000;
const FIVE_MIN: u64 = 300_000;

struct Run {
    clients: u32,
    steady: u32,
    first_s: f64,
    next_s: f64,
    detector_bytes: u64,
    cohort_alerts: usize,
}

fn addr(i: u32) -> IpAddr {
    IpAddr::V4(std::net::Ipv4Addr::from((11u32 << 24) + (i << 8) + 1))
}

fn one(clients: u32, steady_percent: u32) -> Run {
    let mut st = State::default();
    st.add_host(0, "gpu-0".into());
    let end = T0 + 12 * 3_600_000 + 35 * 60_000;
    let steady = (u64::from(clients) * u64::from(steady_percent) / 100) as u32;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for i in 0..clients {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let mut r = Rollup::default();
        // Steady: 7 buckets of 5 minutes at 16 to 256 MiB an hour; else one burst.
        let per_hour = (16u64 << 20) << (x % 5);
        let buckets = if i < steady { 7 } else { 1 };
        for k in 0..buckets {
            r.add(
                end - k * FIVE_MIN,
                0,
                &Totals {
                    response_bytes: per_hour / 12,
                    request_bytes: 2_000,
                    connections_closed: 1 + (x >> 8) % 3,
                },
            );
        }
        st.put(Key::Direct(addr(i)), r);
    }
    st.set_end_ms(end);
    let rss0 = sys::rss_bytes(std::process::id()).unwrap_or(0);
    let mut det = Detector::new(DetectConfig::default(), &st);
    let subjects = || {
        (0..clients)
            .map(|i| Subject::Client(addr(i)))
            .collect::<Vec<_>>()
    };
    det.observe(subjects(), &[], end);
    let t = Instant::now();
    let verdicts = det.judge(&st, end, &[]);
    let first_s = t.elapsed().as_secs_f64();
    let rss1 = sys::rss_bytes(std::process::id()).unwrap_or(0);
    det.observe(subjects(), &[], end + 60_000);
    let t = Instant::now();
    det.judge(&st, end + 60_000, &[]);
    let next_s = t.elapsed().as_secs_f64();
    let cohort_alerts = verdicts
        .iter()
        .filter(|v| matches!(v.subject, Subject::Cohort(_)) && v.finding.is_some())
        .count();
    Run {
        clients,
        steady,
        first_s,
        next_s,
        detector_bytes: rss1.saturating_sub(rss0),
        cohort_alerts,
    }
}

pub fn run(args: &Args) -> Result<Section> {
    let mut runs = Vec::new();
    for &c in &args.clients {
        for &p in &args.steady_percent {
            eprintln!("detect: {c} clients, {p}% steady");
            let r = one(c, p.min(100));
            eprintln!(
                "detect: first judgement {:.2} s, next {:.2} s, detector {}",
                r.first_s,
                r.next_s,
                sys::mib(r.detector_bytes)
            );
            runs.push(r);
        }
    }
    let mut s = Section::new("detect", "Detection cost per judgement, with cohorts");
    s.method = "In process, on one thread: the collector's `Detector` with its default \
        configuration over a `State` of active clients, each in a /24 of its own (none shares a \
        prefix, so the prefix detectors see one member each). A share of them is steady for the \
        last 35 minutes at 16 to 256 MiB an hour (cohort candidates: the cohort detector's work \
        grows with them), the others sent one burst. Every client was touched, so a judgement \
        judges every one of them with every detector, then every cohort around them. The first \
        judgement learns each client (baseline, daily totals, cohort membership); the next, a \
        minute of batch time later, is the steady state. Memory: the process's RSS growth over \
        the first judgement (the detector's per-client state)."
        .into();
    s.commands = vec![
        "cargo build --release -p outflow-bench".into(),
        format!(
            "target/release/outflow-bench detect --clients {} --steady-percent {}",
            args.clients
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(","),
            args.steady_percent
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(",")
        ),
    ];
    s.header = [
        "active clients",
        "cohort candidates",
        "first judgement",
        "next judgement",
        "per client (next)",
        "detector memory",
        "per client",
        "cohort alerts",
    ]
    .map(String::from)
    .to_vec();
    for r in &runs {
        s.row([
            thousands(r.clients.into()),
            thousands(r.steady.into()),
            format!("{:.2} s", r.first_s),
            format!("{:.2} s", r.next_s),
            format!("{:.2} µs", 1e6 * r.next_s / f64::from(r.clients.max(1))),
            sys::mib(r.detector_bytes),
            format!("{} B", r.detector_bytes / u64::from(r.clients.max(1))),
            r.cohort_alerts.to_string(),
        ]);
    }
    s.notes = vec![
        "A judgement runs once per `detect.eval_interval` (1 min of batch time) on the store \
         writer thread, over the clients touched since the last one: the next-judgement time \
         is what a collector with that many active clients spends per minute."
            .into(),
        "Cohort alerts: the steady clients here share bins of rate and size by construction \
         (5 rates, 3 sizes), so with enough of them together their bins are cohorts far over \
         4 × 1 GiB: the alerts are what the detector would raise, counted to show the work \
         was done."
            .into(),
    ];
    Ok(s)
}
