//! The traffic model: benign LLM streaming clients, benign heavy look-alikes that come close to
//! the collector's default limits without crossing them (not allowlisted), and the injected
//! attacks that sit just above them, generated step by step in batch time from one seeded RNG,
//! with a ledger of every byte sent.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use outflow_proto::v1;
use rand::{RngExt as _, SeedableRng as _};
use rand_xorshift::XorShiftRng;

use crate::Scenario;

/// One day in milliseconds.
pub const DAY_MS: u64 = 86_400_000;
/// One hour in milliseconds.
pub const HOUR_MS: u64 = 3_600_000;
/// Bytes of one streamed token event (an SSE `data:` line with its JSON).
pub const TOKEN_EVENT_BYTES: u64 = 200;
/// Shortest and longest benign session, seconds (log-uniform in between).
pub const SESSION_SECS: (f64, f64) = (3.0, 300.0);
/// Benign token rate of one stream, tokens per second (uniform in between).
pub const TOKENS_PER_SEC: (u64, u64) = (50, 200);
/// Benign prompt (request) size, bytes (uniform in between).
pub const PROMPT_BYTES: (u64, u64) = (500, 20_000);
/// Benign sessions per client per hour at the daily peak (log-uniform in between).
pub const SESSIONS_PER_HOUR: (f64, f64) = (0.5, 6.0);
/// Share of benign clients with an IPv6 address.
pub const IPV6_SHARE: f64 = 0.3;
/// Benign IPv4 clients per /24 (on average) and IPv6 clients per /64.
pub const CLIENTS_PER_V4_PREFIX: usize = 8;
pub const CLIENTS_PER_V6_PREFIX: usize = 2;
/// The daily cycle's floor (at 03:00 UTC) relative to its peak (at 15:00 UTC).
pub const NIGHT_FACTOR: f64 = 0.1;
/// Benign sessions on Saturdays and Sundays (UTC), relative to weekdays.
pub const WEEKEND_FACTOR: f64 = 0.4;
/// Prompt (request) size of the look-alikes' connections: enterprise clients send long
/// contexts, so their response/request ratio stays near the benign clients'.
pub const LOOKALIKE_PROMPT_BYTES: (u64, u64) = (20_000, 60_000);

/// Where benign IPv6 clients live (2001:db8:1::/48); IPv4 ones: [`benign_v4_prefix`].
const V6_POOL: [u16; 3] = [0x2001, 0x0db8, 0x0001];

/// A benign heavy client: what a detector's defaults must leave alone. None is allowlisted.
#[derive(Clone, Debug)]
pub struct LookAlike {
    pub name: &'static str,
    pub addrs: Vec<IpAddr>,
    /// Connections per address and bytes per second of each.
    pub conns: usize,
    pub bps_per_conn: u64,
    pub schedule: Schedule,
}

/// When a source sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Schedule {
    Always,
    /// Monday to Friday, 09:00 to 17:00 UTC.
    OfficeHours,
    /// Every night, 00:00 to 06:00 UTC.
    Nightly,
}

impl Schedule {
    /// If the source sends at `t_ms`: until when it goes on without a break (`weekends`: as
    /// [`Params::weekends`]).
    pub fn active_until(self, t_ms: u64, weekends: bool) -> Option<u64> {
        let day = t_ms / DAY_MS * DAY_MS;
        let hour = (t_ms % DAY_MS) / HOUR_MS;
        match self {
            Schedule::Always => Some(u64::MAX),
            Schedule::OfficeHours => (!(weekends && is_weekend(t_ms)) && (9..17).contains(&hour))
                .then_some(day + 17 * HOUR_MS),
            Schedule::Nightly => (hour < 6).then_some(day + 6 * HOUR_MS),
        }
    }
}

/// Whether `t_ms` falls on a Saturday or a Sunday (UTC; 1970-01-01 was a Thursday).
pub fn is_weekend(t_ms: u64) -> bool {
    matches!((t_ms / DAY_MS + 4) % 7, 0 | 6)
}

/// The benign heavy clients, each under every default limit by 10 to 20 %: a customer behind
/// one NAT address at 0.85 GiB an hour in office hours (6.8 GiB a day, 34 GiB a week), an
/// all-day integration at 0.2 GiB an hour (4.8 GiB a day, 33.6 GiB a week), a nightly IPv6
/// batch job at 0.8 GiB an hour for 6 hours (33.6 GiB a week), and a fleet of 20 workers of
/// one customer in one /26, steady at 40 MB an hour each.
pub fn lookalikes() -> Vec<LookAlike> {
    vec![
        LookAlike {
            name: "nat",
            addrs: vec![IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10))],
            conns: 16,
            bps_per_conn: 15_850,
            schedule: Schedule::OfficeHours,
        },
        LookAlike {
            name: "integration",
            addrs: vec![IpAddr::V4(Ipv4Addr::new(192, 0, 2, 11))],
            conns: 4,
            bps_per_conn: 14_900,
            schedule: Schedule::Always,
        },
        LookAlike {
            name: "nightly",
            addrs: vec![IpAddr::V6(Ipv6Addr::new(
                0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 0x10,
            ))],
            conns: 8,
            bps_per_conn: 29_800,
            schedule: Schedule::Nightly,
        },
        LookAlike {
            name: "fleet",
            addrs: (64..84u8)
                .map(|i| IpAddr::V4(Ipv4Addr::new(192, 0, 2, i)))
                .collect(),
            conns: 1,
            bps_per_conn: 11_100,
            schedule: Schedule::Always,
        },
    ]
}

/// Every look-alike address.
pub fn lookalike_clients() -> Vec<IpAddr> {
    lookalikes().into_iter().flat_map(|l| l.addrs).collect()
}

/// What the generator needs to know.
#[derive(Clone, Debug)]
pub struct Params {
    pub hosts: usize,
    pub clients: usize,
    pub days: u32,
    pub seed: u64,
    pub batch_ms: u64,
    /// Batch time of the first batch's start (Unix ms).
    pub start_ms: u64,
    /// Offset into the last simulated day at which the attacks begin.
    pub attack_offset_ms: u64,
    /// Saturdays and Sundays are quieter, with no office hours (else every day is a weekday).
    pub weekends: bool,
}

impl Params {
    pub fn end_ms(&self) -> u64 {
        self.start_ms + u64::from(self.days) * DAY_MS
    }
    pub fn steps(&self) -> u64 {
        (self.end_ms() - self.start_ms).div_ceil(self.batch_ms)
    }
    /// When the attacks start: `attack_offset_ms` into the last day.
    pub fn attack_start_ms(&self) -> u64 {
        self.end_ms() - DAY_MS + self.attack_offset_ms
    }
}

/// Who a connection belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Owner {
    Benign,
    LookAlike,
    Attack(usize),
}

/// How a source's rate evolves: per connection, bytes per second.
#[derive(Clone, Copy, Debug)]
enum Rate {
    Const(u64),
    /// `from` until `ramp_start_ms`, then linearly up to `to` at the source's end.
    Ramp {
        from: u64,
        to: u64,
        ramp_start_ms: u64,
    },
}

/// Which addresses a source uses.
#[derive(Clone, Debug)]
enum Addrs {
    Fixed(Vec<IpAddr>),
    /// A new random address inside `prefix` every `every_ms`.
    Rotate {
        prefix: Ipv6Net,
        every_ms: u64,
    },
}

/// A persistent traffic source: `conns_per_addr` connections per address kept open from
/// `start_ms` to `end_ms` while its schedule says so, each renewed after about `conn_ms`
/// (on a batch boundary, so that a connection follows the last without a gap).
#[derive(Clone, Debug)]
struct Source {
    owner: Owner,
    addrs: Addrs,
    conns_per_addr: usize,
    conn_ms: u64,
    start_ms: u64,
    end_ms: u64,
    rate: Rate,
    schedule: Schedule,
    prompt: (u64, u64),
    /// Until when each (address slot, connection slot)'s last connection runs: its next one
    /// starts there (0: none yet).
    busy_until: Vec<u64>,
}

impl Source {
    fn slots(&self) -> usize {
        let n = match &self.addrs {
            Addrs::Fixed(a) => a.len(),
            Addrs::Rotate { .. } => 1,
        };
        n * self.conns_per_addr
    }

    fn bps(&self, t_ms: u64) -> u64 {
        match self.rate {
            Rate::Const(b) => b,
            Rate::Ramp {
                from,
                to,
                ramp_start_ms,
            } => {
                if t_ms <= ramp_start_ms {
                    from
                } else {
                    let span = (self.end_ms - ramp_start_ms).max(1);
                    let done = (t_ms - ramp_start_ms).min(span);
                    from + (to - from) * done / span
                }
            }
        }
    }
}

/// One injected attack as the generator and the scorer see it.
#[derive(Clone, Debug)]
pub struct Attack {
    pub scenario: Scenario,
    /// When the attack begins (for a slow rise: when the rise begins).
    pub start_ms: u64,
    /// Every address it used (filled while generating).
    pub addrs: HashSet<IpAddr>,
    /// The prefix it lives in (for prefix and rotation attacks).
    pub prefix: Option<IpNet>,
    /// Response bytes of the attacker after each step: (end_ms, cumulative bytes since the
    /// attack's start).
    pub cumulative: Vec<(u64, u64)>,
    /// Response bytes pulled since `start_ms`.
    pub bytes: u64,
}

/// A live connection.
#[derive(Clone, Debug)]
struct Conn {
    host: usize,
    conn_id: u64,
    client: IpAddr,
    remote_port: u32,
    start_ms: u64,
    end_ms: u64,
    /// Fixed rate (benign) or the source's rate at each step.
    bps: u64,
    source: Option<(usize, usize)>,
    request_bytes: u64,
    owner: Owner,
    first: bool,
}

/// What one step sent, in total.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct StepTotals {
    pub end_ms: u64,
    pub response_bytes: u64,
    pub request_bytes: u64,
}

/// The largest benign (not allowlisted) keys: what a detector's thresholds must stay above.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct BenignStats {
    /// Largest response bytes of one benign address in one clock hour, and the address.
    pub max_client_hour_bytes: u64,
    pub max_client_hour_key: String,
    /// Largest response bytes of one benign /24 or /64 in one clock hour.
    pub max_prefix_hour_bytes: u64,
    pub max_prefix_hour_key: String,
    /// Largest response bytes of one benign address / prefix in one UTC day.
    pub max_client_day_bytes: u64,
    pub max_prefix_day_bytes: u64,
    /// Benign addresses and /24 + /64 prefixes that sent anything.
    pub active_clients: usize,
    pub active_prefixes: usize,
}

/// Response and request bytes per host (by index) and per client address.
pub type Totals = (Vec<(u64, u64)>, HashMap<IpAddr, (u64, u64)>);

/// The generator: call [`Generator::step`] once per batch interval.
#[derive(Debug)]
pub struct Generator {
    pub params: Params,
    rng: XorShiftRng,
    clients: Vec<(IpAddr, f64)>,
    sources: Vec<Source>,
    conns: Vec<Conn>,
    next_conn_id: Vec<u64>,
    step: u64,
    pub attacks: Vec<Attack>,
    /// Response and request bytes sent per host and per client address.
    pub host_totals: Vec<(u64, u64)>,
    pub client_totals: HashMap<IpAddr, (u64, u64)>,
    /// `host_totals` and `client_totals` before the step that ends where the last day starts
    /// (a run of more than one day): what the 24 h window of the last day holds is the
    /// difference.
    pub before_last_day: Option<Totals>,
    pub steps: Vec<StepTotals>,
    pub deltas: u64,
    benign_hour: (u64, HashMap<IpAddr, u64>, HashMap<IpNet, u64>),
    benign_day: (u64, HashMap<IpAddr, u64>, HashMap<IpNet, u64>),
    pub benign: BenignStats,
    benign_seen: (HashSet<IpAddr>, HashSet<IpNet>),
}

/// The /24 or /64 holding `a`.
pub fn prefix_of(a: IpAddr) -> IpNet {
    match a {
        IpAddr::V4(v4) => IpNet::V4(Ipv4Net::new(v4, 24).expect("24 <= 32").trunc()),
        IpAddr::V6(v6) => IpNet::V6(Ipv6Net::new(v6, 64).expect("64 <= 128").trunc()),
    }
}

/// The daily cycle at `t_ms`: NIGHT_FACTOR at 03:00 UTC, 1 at 15:00 UTC.
pub fn daily_cycle(t_ms: u64) -> f64 {
    let hour = (t_ms % DAY_MS) as f64 / HOUR_MS as f64;
    let x = (1.0 - (2.0 * std::f64::consts::PI * (hour - 3.0) / 24.0).cos()) / 2.0;
    NIGHT_FACTOR + (1.0 - NIGHT_FACTOR) * x
}

fn log_uniform(rng: &mut XorShiftRng, lo: f64, hi: f64) -> f64 {
    (lo.ln() + rng.random::<f64>() * (hi.ln() - lo.ln())).exp()
}

impl Generator {
    /// Builds the client population and the attack sources of `scenarios`.
    pub fn new(params: Params, scenarios: &[Scenario]) -> Generator {
        let mut rng = XorShiftRng::seed_from_u64(params.seed);
        let mut clients = Vec::with_capacity(params.clients);
        let mut seen = HashSet::new();
        let n_v6 = (params.clients as f64 * IPV6_SHARE).round() as usize;
        let n_v4 = params.clients - n_v6;
        let v4_prefixes = n_v4.div_ceil(CLIENTS_PER_V4_PREFIX).clamp(1, 512) as u32;
        let v6_prefixes = n_v6.div_ceil(CLIENTS_PER_V6_PREFIX).clamp(1, 65_536) as u32;
        while clients.len() < params.clients {
            let addr = if clients.len() < n_v4 {
                let p = rng.random_range(0..v4_prefixes);
                let base = u32::from(benign_v4_prefix(p));
                IpAddr::V4(Ipv4Addr::from(base + rng.random_range(1..255u32)))
            } else {
                let p = rng.random_range(0..v6_prefixes) as u16;
                IpAddr::V6(Ipv6Addr::new(
                    V6_POOL[0],
                    V6_POOL[1],
                    V6_POOL[2],
                    p,
                    rng.random(),
                    rng.random(),
                    rng.random(),
                    rng.random(),
                ))
            };
            if seen.insert(addr) {
                let rate = log_uniform(&mut rng, SESSIONS_PER_HOUR.0, SESSIONS_PER_HOUR.1);
                clients.push((addr, rate));
            }
        }

        let end = params.end_ms();
        // A source: `conns` connections per address of `conn_ms`, from `start`, always on,
        // with the benign prompt sizes.
        let source = |owner, addrs, conns, conn_ms, start, rate| Source {
            owner,
            addrs,
            conns_per_addr: conns,
            conn_ms,
            start_ms: start,
            end_ms: end,
            rate,
            schedule: Schedule::Always,
            prompt: PROMPT_BYTES,
            busy_until: Vec::new(),
        };
        let mut sources: Vec<Source> = lookalikes()
            .into_iter()
            .map(|l| Source {
                schedule: l.schedule,
                prompt: LOOKALIKE_PROMPT_BYTES,
                ..source(
                    Owner::LookAlike,
                    Addrs::Fixed(l.addrs),
                    l.conns,
                    10 * 60_000,
                    params.start_ms,
                    Rate::Const(l.bps_per_conn),
                )
            })
            .collect();
        let mut attacks = Vec::new();
        let attack_start = params.attack_start_ms();
        let v4 = |a: [u8; 4]| IpAddr::V4(Ipv4Addr::from(a));
        for &s in scenarios {
            let owner = Owner::Attack(attacks.len());
            let fixed = Addrs::Fixed;
            let (source, prefix, start) = match s {
                Scenario::Benign => continue,
                Scenario::All => unreachable!("expanded by Scenario::attacks"),
                Scenario::Bulk => (
                    source(
                        owner,
                        fixed(vec![v4([203, 0, 113, 7])]),
                        BULK_CONNS,
                        20 * 60_000,
                        attack_start,
                        Rate::Const(BULK_BPS_PER_CONN),
                    ),
                    None,
                    attack_start,
                ),
                Scenario::Prefix => (
                    source(
                        owner,
                        fixed(
                            (1..=PREFIX_MEMBERS as u8)
                                .map(|i| v4([198, 51, 100, i]))
                                .collect(),
                        ),
                        1,
                        10 * 60_000,
                        attack_start,
                        Rate::Const(PREFIX_BPS_PER_ADDR),
                    ),
                    Some(IpNet::V4(
                        Ipv4Net::new(Ipv4Addr::new(198, 51, 100, 0), 24).expect("valid"),
                    )),
                    attack_start,
                ),
                Scenario::Rotate6 => {
                    let prefix =
                        Ipv6Net::new(Ipv6Addr::new(0x2001, 0xdb8, 0xbad, 1, 0, 0, 0, 0), 64)
                            .expect("valid");
                    (
                        source(
                            owner,
                            Addrs::Rotate {
                                prefix,
                                every_ms: ROTATE_EVERY_MS,
                            },
                            ROTATE_CONNS,
                            ROTATE_EVERY_MS,
                            attack_start,
                            Rate::Const(ROTATE_BPS_PER_CONN),
                        ),
                        Some(IpNet::V6(prefix)),
                        attack_start,
                    )
                }
                Scenario::SlowRise => {
                    let ramp_start = end - DAY_MS;
                    (
                        source(
                            owner,
                            fixed(vec![v4([100, 64, 77, 77])]),
                            SLOWRISE_CONNS,
                            15 * 60_000,
                            params.start_ms,
                            Rate::Ramp {
                                from: SLOWRISE_BPS.0 / SLOWRISE_CONNS as u64,
                                to: SLOWRISE_BPS.1 / SLOWRISE_CONNS as u64,
                                ramp_start_ms: ramp_start,
                            },
                        ),
                        None,
                        ramp_start,
                    )
                }
                Scenario::Parallel => (
                    source(
                        owner,
                        fixed(vec![v4([100, 64, 99, 99])]),
                        PARALLEL_CONNS,
                        10 * 60_000,
                        attack_start,
                        Rate::Const(PARALLEL_BPS_PER_CONN),
                    ),
                    None,
                    attack_start,
                ),
                Scenario::Wide => (
                    source(
                        owner,
                        fixed(
                            (0..WIDE_MEMBERS as u32)
                                .map(|i| v4([100, 96, (i / 2 * 2) as u8, 10 + (i % 2) as u8]))
                                .collect(),
                        ),
                        1,
                        20 * 60_000,
                        attack_start,
                        Rate::Const(WIDE_BPS_PER_ADDR),
                    ),
                    Some(IpNet::V4(
                        Ipv4Net::new(Ipv4Addr::new(100, 96, 0, 0), 16).expect("valid"),
                    )),
                    attack_start,
                ),
                Scenario::Pool => (
                    source(
                        owner,
                        fixed((0..POOL_MEMBERS as u32).map(pool_addr).collect()),
                        1,
                        20 * 60_000,
                        attack_start,
                        Rate::Const(POOL_BPS_PER_ADDR),
                    ),
                    None,
                    attack_start,
                ),
                Scenario::LowSlow => {
                    let mut src = source(
                        owner,
                        fixed(vec![v4([100, 64, 88, 88])]),
                        LOWSLOW_CONNS,
                        10 * 60_000,
                        params.start_ms,
                        Rate::Const(LOWSLOW_BPS_PER_CONN),
                    );
                    // Long prompts: a ratio like the benign clients', so only its week shows.
                    src.prompt = LOOKALIKE_PROMPT_BYTES;
                    (src, None, params.start_ms)
                }
            };
            attacks.push(Attack {
                scenario: s,
                start_ms: start,
                addrs: HashSet::new(),
                prefix,
                cumulative: Vec::new(),
                bytes: 0,
            });
            sources.push(source);
        }
        for s in &mut sources {
            s.busy_until = vec![0; s.slots()];
        }
        let hosts = params.hosts;
        Generator {
            params,
            rng,
            clients,
            sources,
            conns: Vec::new(),
            next_conn_id: vec![1; hosts],
            step: 0,
            attacks,
            host_totals: vec![(0, 0); hosts],
            client_totals: HashMap::new(),
            before_last_day: None,
            steps: Vec::new(),
            deltas: 0,
            benign_hour: (0, HashMap::new(), HashMap::new()),
            benign_day: (0, HashMap::new(), HashMap::new()),
            benign: BenignStats::default(),
            benign_seen: (HashSet::new(), HashSet::new()),
        }
    }

    /// Whether every step has been generated.
    pub fn done(&self) -> bool {
        self.step >= self.params.steps()
    }

    fn new_conn_id(&mut self, host: usize) -> u64 {
        let id = self.next_conn_id[host];
        self.next_conn_id[host] += 1;
        // Socket cookies are unique per boot; make them look like kernel cookies.
        (host as u64) << 40 | id
    }

    /// Generates the next interval: one batch per host (seq = step + 1).
    pub fn step(&mut self) -> (u64, u64, Vec<Vec<v1::ConnDelta>>) {
        let (batch_ms, seed, hosts) = (self.params.batch_ms, self.params.seed, self.params.hosts);
        let t0 = self.params.start_ms + self.step * batch_ms;
        let t1 = (t0 + batch_ms).min(self.params.end_ms());
        self.step += 1;
        // The last day in a collector's 24 h window: the batches ending in it, at its start
        // too (a window holds both ends).
        if t1 == self.params.end_ms() - DAY_MS {
            self.before_last_day = Some((self.host_totals.clone(), self.client_totals.clone()));
        }

        // New benign sessions.
        let f = daily_cycle(t0)
            * if self.params.weekends && is_weekend(t0) {
                WEEKEND_FACTOR
            } else {
                1.0
            };
        let frac = (t1 - t0) as f64 / HOUR_MS as f64;
        for c in 0..self.clients.len() {
            let (addr, per_hour) = self.clients[c];
            if self.rng.random::<f64>() >= (per_hour * f * frac).min(1.0) {
                continue;
            }
            let start = t0 + self.rng.random_range(0..t1 - t0);
            let secs = log_uniform(&mut self.rng, SESSION_SECS.0, SESSION_SECS.1);
            let tokens = self.rng.random_range(TOKENS_PER_SEC.0..=TOKENS_PER_SEC.1);
            let host = self.rng.random_range(0..hosts);
            let conn = Conn {
                host,
                conn_id: self.new_conn_id(host),
                client: addr,
                remote_port: self.rng.random_range(1024..65535),
                start_ms: start,
                end_ms: start + (secs * 1000.0) as u64,
                bps: tokens * TOKEN_EVENT_BYTES,
                source: None,
                request_bytes: self.rng.random_range(PROMPT_BYTES.0..=PROMPT_BYTES.1),
                owner: Owner::Benign,
                first: true,
            };
            self.conns.push(conn);
        }

        // Persistent sources: refill dead slots.
        for si in 0..self.sources.len() {
            let s = &self.sources[si];
            if t0 >= s.end_ms {
                continue;
            }
            let start = t0.max(s.start_ms);
            if start >= t1 {
                continue;
            }
            let Some(until) = s.schedule.active_until(start, self.params.weekends) else {
                continue;
            };
            let limit = s.end_ms.min(until);
            for slot in 0..s.busy_until.len() {
                // A connection may end inside the batch (a rotating source's ends where its
                // address's period does): the next one follows it there, so the source sends
                // at its rate whatever the batch length.
                let mut from = start.max(self.sources[si].busy_until[slot]);
                if from >= t1 || from >= limit {
                    continue;
                }
                loop {
                    let s = &self.sources[si];
                    let jitter = 0.5 + self.rng.random::<f64>();
                    // Ends on a batch boundary: the next connection follows without a gap.
                    let len = ((s.conn_ms as f64 * jitter) as u64).div_ceil(batch_ms) * batch_ms;
                    let mut end = (from + len).min(limit);
                    let client = match &s.addrs {
                        Addrs::Fixed(a) => a[slot / s.conns_per_addr],
                        Addrs::Rotate { prefix, every_ms } => {
                            let period = (from - s.start_ms) / every_ms;
                            end = end.min(s.start_ms + (period + 1) * every_ms);
                            rotated_addr(*prefix, seed, period)
                        }
                    };
                    let (owner, prompt) = (s.owner, s.prompt);
                    let host = self.rng.random_range(0..hosts);
                    let conn = Conn {
                        host,
                        conn_id: self.new_conn_id(host),
                        client,
                        remote_port: self.rng.random_range(1024..65535),
                        start_ms: from,
                        end_ms: end,
                        bps: 0,
                        source: Some((si, slot)),
                        request_bytes: self.rng.random_range(prompt.0..=prompt.1),
                        owner,
                        first: true,
                    };
                    self.sources[si].busy_until[slot] = end;
                    if let Owner::Attack(a) = owner {
                        self.attacks[a].addrs.insert(client);
                    }
                    self.conns.push(conn);
                    if end >= t1 || end >= limit {
                        break;
                    }
                    from = end;
                }
            }
        }

        // Every live connection's delta for [t0, t1).
        let mut batches: Vec<Vec<v1::ConnDelta>> = vec![Vec::new(); hosts];
        let mut totals = StepTotals {
            end_ms: t1,
            ..StepTotals::default()
        };
        let mut attack_step = vec![0u64; self.attacks.len()];
        let mut keep = Vec::with_capacity(self.conns.len());
        for mut c in std::mem::take(&mut self.conns) {
            if c.start_ms >= t1 {
                keep.push(c);
                continue;
            }
            let from = c.start_ms.max(t0);
            let to = c.end_ms.min(t1);
            let bps = match c.source {
                Some((si, _)) => self.sources[si].bps((from + to) / 2),
                None => c.bps,
            };
            let out = bps * to.saturating_sub(from) / 1000;
            let inb = if c.first { c.request_bytes } else { 0 };
            let closed = c.end_ms <= t1;
            batches[c.host].push(delta(&c, out, inb, closed));
            self.deltas += 1;
            totals.response_bytes += out;
            totals.request_bytes += inb;
            let h = &mut self.host_totals[c.host];
            h.0 += out;
            h.1 += inb;
            let ct = self.client_totals.entry(c.client).or_default();
            ct.0 += out;
            ct.1 += inb;
            match c.owner {
                Owner::Attack(a) => {
                    if t1 > self.attacks[a].start_ms {
                        attack_step[a] += out;
                    }
                }
                Owner::Benign => {
                    let pfx = prefix_of(c.client);
                    *self.benign_hour.1.entry(c.client).or_default() += out;
                    *self.benign_hour.2.entry(pfx).or_default() += out;
                    *self.benign_day.1.entry(c.client).or_default() += out;
                    *self.benign_day.2.entry(pfx).or_default() += out;
                    self.benign_seen.0.insert(c.client);
                    self.benign_seen.1.insert(pfx);
                }
                Owner::LookAlike => {}
            }
            c.first = false;
            if !closed {
                keep.push(c);
            }
        }
        self.conns = keep;
        for (a, b) in self.attacks.iter_mut().zip(attack_step) {
            a.bytes += b;
            a.cumulative.push((t1, a.bytes));
        }
        self.steps.push(totals);
        self.roll_benign(t1);
        (t0, t1, batches)
    }

    /// Closes the benign hour and day buckets that end at or before `t1`.
    fn roll_benign(&mut self, t1: u64) {
        let last = t1 >= self.params.end_ms();
        if t1.is_multiple_of(HOUR_MS) || last {
            let (_, clients, prefixes) = std::mem::take(&mut self.benign_hour);
            if let Some((k, v)) = clients.iter().max_by_key(|(_, v)| **v)
                && *v > self.benign.max_client_hour_bytes
            {
                self.benign.max_client_hour_bytes = *v;
                self.benign.max_client_hour_key = k.to_string();
            }
            if let Some((k, v)) = prefixes.iter().max_by_key(|(_, v)| **v)
                && *v > self.benign.max_prefix_hour_bytes
            {
                self.benign.max_prefix_hour_bytes = *v;
                self.benign.max_prefix_hour_key = k.to_string();
            }
        }
        if t1.is_multiple_of(DAY_MS) || last {
            let (_, clients, prefixes) = std::mem::take(&mut self.benign_day);
            let c = clients.values().copied().max().unwrap_or(0);
            let p = prefixes.values().copied().max().unwrap_or(0);
            self.benign.max_client_day_bytes = self.benign.max_client_day_bytes.max(c);
            self.benign.max_prefix_day_bytes = self.benign.max_prefix_day_bytes.max(p);
        }
        self.benign.active_clients = self.benign_seen.0.len();
        self.benign.active_prefixes = self.benign_seen.1.len();
    }

    /// Response and request bytes per client address, sorted (for reports and tests).
    pub fn client_totals_sorted(&self) -> BTreeMap<IpAddr, (u64, u64)> {
        self.client_totals.iter().map(|(k, v)| (*k, *v)).collect()
    }
}

/// Attack magnitudes (see [`Scenario`](crate::Scenario)): each 1.1 to 1.3 times the default
/// limit it must cross.
pub const BULK_CONNS: usize = 16;
pub const BULK_BPS_PER_CONN: u64 = 22_000;
pub const PREFIX_MEMBERS: usize = 50;
pub const PREFIX_BPS_PER_ADDR: u64 = 30_000;
pub const ROTATE_EVERY_MS: u64 = 5 * 60_000;
pub const ROTATE_CONNS: usize = 16;
pub const ROTATE_BPS_PER_CONN: u64 = 22_000;
pub const SLOWRISE_CONNS: usize = 2;
/// Total bytes per second of the slow riser: before the rise, and at the end of the day.
pub const SLOWRISE_BPS: (u64, u64) = (2_000, 200_000);
pub const PARALLEL_CONNS: usize = 64;
pub const PARALLEL_BPS_PER_CONN: u64 = 5_400;
pub const WIDE_MEMBERS: usize = 240;
pub const WIDE_BPS_PER_ADDR: u64 = 22_200;
pub const POOL_MEMBERS: usize = 250;
pub const POOL_BPS_PER_ADDR: u64 = 5_560;
pub const LOWSLOW_CONNS: usize = 4;
/// 6.5 GiB a day.
pub const LOWSLOW_BPS_PER_CONN: u64 = 20_200;

/// The `p`-th /24 of the benign IPv4 clients (`p` < 512): each in a /16 of its own (as the
/// clients of a public API come from many networks; a cluster partitions clients by /16), none
/// in 100.0.0.0/8 or 127.0.0.0/8, none of [`pool_addr`]'s /24s (third octet 7) or the
/// look-alikes' 192.0.2.0/24.
pub fn benign_v4_prefix(p: u32) -> Ipv4Addr {
    let mut first = 21 + (p % 170) as u8;
    for taken in [100, 127] {
        if first >= taken {
            first += 1;
        }
    }
    Ipv4Addr::new(first, (p * 97 % 251) as u8, 128 + (p / 170) as u8, 0)
}

/// Member `i` (below 251) of the proxy pool: an address in a /24 of its own, in 170 different
/// /8s, none of the benign clients', the look-alikes' or the other attacks'.
pub fn pool_addr(i: u32) -> IpAddr {
    let mut first = 21 + (i % 170) as u8;
    for taken in [100, 127] {
        if first >= taken {
            first += 1;
        }
    }
    IpAddr::V4(Ipv4Addr::new(first, (i * 37 % 251) as u8, 7, 1))
}

/// The address of rotation `period` inside `prefix`: deterministic in (seed, period).
fn rotated_addr(prefix: Ipv6Net, seed: u64, period: u64) -> IpAddr {
    let mut r =
        XorShiftRng::seed_from_u64(seed ^ 0x5eed_0006 ^ period.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let iid: u64 = r.random::<u64>() | 1;
    let net = u128::from(prefix.network());
    IpAddr::V6(Ipv6Addr::from(net | u128::from(iid)))
}

fn addr_bytes(a: IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(v) => v.octets().to_vec(),
        IpAddr::V6(v) => v.octets().to_vec(),
    }
}

fn delta(c: &Conn, out: u64, inb: u64, closed: bool) -> v1::ConnDelta {
    let local = match c.client {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::new(
            10,
            64,
            (c.host / 256) as u8,
            (c.host % 256) as u8,
        )),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::new(0xfd00, 0x64, 0, 0, 0, 0, 0, c.host as u16)),
    };
    let seg_out = out.div_ceil(TOKEN_EVENT_BYTES);
    let seg_in = inb.div_ceil(1400) + seg_out / 2;
    v1::ConnDelta {
        conn_id: c.conn_id,
        local_addr: addr_bytes(local),
        local_port: 8000,
        remote_addr: addr_bytes(c.client),
        remote_port: c.remote_port,
        role: v1::Role::Server as i32,
        counters: Some(v1::Counters {
            bytes_out: out,
            bytes_in: inb,
            wire_bytes_out: out + 52 * seg_out,
            wire_bytes_in: inb + 52 * seg_in,
            segments_out: seg_out,
            segments_in: seg_in,
        }),
        closed,
        cgroup: "/system.slice/vllm.service".into(),
        pid: 4242,
        comm: "vllm".into(),
        first_seen_ms: c.start_ms,
        // No client attribution: the remote address is the client.
        ..Default::default()
    }
}

/// Host names of the simulated fleet.
pub fn host_name(i: usize) -> String {
    format!("sim-gpu-{i:04}")
}
