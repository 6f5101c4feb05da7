//! The read loop: each interval, read the table, emit what changed, then commit it.
use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use agent_common::{Counters, stat};
use aya::maps::{MapData, RingBuf};
use outflow_attribution::{Client, Resolver};

use crate::{
    attribution::{Attributor, Part},
    config::Config,
    durability::{Durability, DurabilityError, Flushed, Interval},
    enrich::{CgroupNames, Listeners},
    filter::Filter,
    kernel::{self, Kernel, KernelError, LoadSettings},
    probe::Operation,
    record::{
        AttributionStatsRecord, ConnRecord, OverflowRecord, Role, Sink, StartedRecord, StatsRecord,
    },
    table::{CommitPlan, OverflowCommit, SlotCommit, SlotDelta, TableError},
};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(transparent)]
    Table(#[from] TableError),
    #[error("cannot write records: {0}")]
    Output(#[from] std::io::Error),
    #[error(transparent)]
    Durability(#[from] DurabilityError),
    #[error("attribution: {0}")]
    Attribution(String),
}

/// Nanoseconds on `CLOCK_BOOTTIME` (what the kernel programs stamp) and the matching wall time.
#[derive(Clone, Copy)]
struct Clock {
    boot_ns: u64,
    unix_ms: u64,
}

fn clock_ns(id: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer; these clocks always exist on Linux.
    unsafe { libc::clock_gettime(id, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

impl Clock {
    fn now() -> Self {
        Self {
            boot_ns: clock_ns(libc::CLOCK_BOOTTIME),
            unix_ms: clock_ns(libc::CLOCK_REALTIME) / 1_000_000,
        }
    }

    /// Wall time of a boot-time stamp.
    const fn unix_ms_of(&self, boot_ns: u64) -> u64 {
        self.unix_ms
            .saturating_sub(self.boot_ns.saturating_sub(boot_ns) / 1_000_000)
    }
}

pub struct Agent {
    kernel: Kernel,
    cgroups: CgroupNames,
    listeners: Listeners,
    filter: Filter,
    sink: Box<dyn Sink + Send>,
    /// What keeps each interval before it is committed (the export's spool), if anything does.
    durability: Option<Box<dyn Durability + Send>>,
    last_stats: Option<StatsRecord>,
    /// The overflow counters as last read (cumulative: every byte of connections that found
    /// the table full, since the state was created).
    overflow_total: Counters,
    attributor: Attributor,
    /// Turn and annotation events from the kernel.
    events: RingBuf<MapData>,
    /// Free slots found claimed at start, and when: handed back once they still are after
    /// [`STALE_CLAIM_WAIT`] (a previous agent killed mid-commit left them).
    stale_claims: Option<(Instant, Vec<(u32, u32)>)>,
}

/// An interval's connection and overflow records, held back from the sink until the
/// durability step has kept the interval.
#[derive(Default)]
struct Held {
    conns: Vec<ConnRecord>,
    overflow: Option<OverflowRecord>,
}

/// How long a free slot must stay claimed before its claim is taken for a leftover.
const STALE_CLAIM_WAIT: Duration = Duration::from_secs(1);

/// Most ring buffer records read in one go (the kernel may write as fast as they are read).
const DRAIN_MAX: usize = 65_536;

/// The attribution resolver of the configuration, with its key file read.
fn resolver(cfg: &Config) -> Result<Resolver, AgentError> {
    let a = &cfg.attribution;
    let key = match &a.id_key_file {
        Some(path) => Some(std::fs::read(path).map_err(|e| {
            AgentError::Attribution(format!(
                "cannot read attribution.id_key_file {}: {e}",
                path.display()
            ))
        })?),
        None => None,
    };
    Resolver::new(a, key.as_deref()).map_err(|e| AgentError::Attribution(e.to_string()))
}

/// Redoes what of `plan` was not committed (see [`crate::table::ConnTable::redo`]).
fn redo(kernel: &mut Kernel, plan: &CommitPlan) -> Result<(), AgentError> {
    let slots = kernel.table.redo(&plan.slots, Clock::now().boot_ns)?;
    let mut overflow = false;
    if let Some(o) = plan.overflow
        && kernel.overflow_reported()? == o.before
    {
        kernel.set_overflow_reported(o.after)?;
        overflow = true;
    }
    if slots > 0 || overflow {
        log::info!(
            "completed the previous agent's last commit ({slots} connections{}): its records are already spooled",
            if overflow { ", overflow" } else { "" }
        );
    }
    Ok(())
}

impl Agent {
    /// Checks the environment, loads or adopts the kernel state, attaches, and says so.
    /// `durability`: the step that keeps each interval before it is committed (the export's
    /// spool), if any.
    pub fn start(
        cfg: &Config,
        mut sink: Box<dyn Sink + Send>,
        mut durability: Option<Box<dyn Durability + Send>>,
    ) -> Result<Self, AgentError> {
        kernel::require_capabilities(Operation::Run {
            pin_dir: &cfg.pin_dir,
        })?;
        let resolver = resolver(cfg)?;
        let mount = kernel::cgroup2_mount()?;
        let cgroup = kernel::resolve_cgroup(cfg.cgroup.as_deref())?;
        let mut kernel = Kernel::open(&LoadSettings {
            cgroup: &cgroup,
            pin_dir: &cfg.pin_dir,
            max_connections: cfg.max_connections,
            exclude_loopback: !cfg.filter.include_loopback,
            capture_bytes: if cfg.attribution.captures() {
                cfg.attribution.capture_bytes
            } else {
                0
            },
            ring_bytes: cfg.attribution.ring_bytes,
        })?;
        let events = kernel.take_events()?;
        let rel = cgroup.strip_prefix(&mount).map_or_else(
            |_| cgroup.display().to_string(),
            |r| format!("/{}", r.display()),
        );
        // A previous agent may have made an interval durable and died before committing it.
        // (Without adopted state there is nothing to redo: that table is gone.)
        if let Some(d) = &mut durability
            && let Some(plan) = d.recover()?
        {
            if kernel.adopted {
                redo(&mut kernel, &plan)?;
            }
            d.committed()?;
        }
        let stale_claims = kernel
            .adopted
            .then(|| (Instant::now(), kernel.table.claimed_free_slots()));
        sink.started(&StartedRecord {
            cgroup: rel.clone(),
            pin_dir: cfg.pin_dir.display().to_string(),
            adopted: kernel.adopted,
            capacity: kernel.table.capacity(),
            metrics: cfg.metrics_listen,
        })?;
        Ok(Self {
            kernel,
            cgroups: CgroupNames::new(mount, PathBuf::from(&cgroup)),
            listeners: Listeners::default(),
            filter: Filter::new(cfg.filter.clone()),
            sink,
            durability,
            last_stats: None,
            overflow_total: Counters::default(),
            attributor: Attributor::new(resolver),
            events,
            stale_claims,
        })
    }

    /// The stats record of the last interval, if one was read.
    pub const fn stats(&self) -> Option<&StatsRecord> {
        self.last_stats.as_ref()
    }

    /// The overflow counters as last read (cumulative).
    pub const fn overflow_total(&self) -> &Counters {
        &self.overflow_total
    }

    /// How often and for how long each kernel program ran (see [`Kernel::program_runs`]).
    pub fn program_runs(&self) -> Vec<kernel::ProgramRuns> {
        self.kernel.program_runs()
    }

    /// The ring buffer's fd, to wait for events on.
    pub fn events_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd as _;
        self.events.as_raw_fd()
    }

    /// Reads the kernel's turn and annotation events that are ready.
    pub fn drain_events(&mut self) {
        let table = &self.kernel.table;
        let attributor = &mut self.attributor;
        for _ in 0..DRAIN_MAX {
            let Some(record) = self.events.next() else {
                break;
            };
            attributor.on_record(&record, table);
        }
    }

    /// One interval: read every changed or closed connection, the overflow, the stats, and emit
    /// them; with a durability step, make the interval durable with its commit plan first (its
    /// connection and overflow records are emitted once it is: a deferred interval is neither
    /// emitted nor committed, and the next read has its bytes again); flush; then record what
    /// was emitted as reported, and tell the durability step. A crash before the commit repeats
    /// rather than loses; a durability step that keeps the commit plan with its durable records
    /// lets the next agent finish the commit instead, so nothing is repeated either.
    pub fn poll(&mut self) -> Result<(), AgentError> {
        if let Some((since, slots)) = &self.stale_claims
            && since.elapsed() >= STALE_CLAIM_WAIT
        {
            let n = self.kernel.table.release_stale_claims(slots)?;
            if n > 0 {
                log::info!(
                    "handed back {n} table slots a previous agent freed but was killed before releasing"
                );
            }
            self.stale_claims = None;
        }
        let clock = Clock::now();
        self.sink.begin(clock.unix_ms)?;
        let mut deltas = self.kernel.table.collect();
        // After the table: every turn that started before a byte read above has its event in
        // the ring buffer by now.
        self.drain_events();
        let mut plan = CommitPlan::default();
        let mut held = Held::default();
        for d in &mut deltas {
            let split = self.attributor.split(d);
            // Bytes of a turn whose client is not known yet stay unreported, uncommitted.
            d.delta = split.upto.delta_since(&d.reported());
            d.snapshot = split.upto;
            if !self
                .filter
                .admits(d.identity.local_port, d.identity.remote_addr)
            {
                continue;
            }
            let last = split.parts.len().saturating_sub(1);
            if split.parts.is_empty() && d.closed {
                let client = crate::attribution::peer_client(d.identity.remote_addr);
                let r = self.record(d, &Counters::default(), &client, true, clock);
                self.conn(&mut held, r)?;
            }
            for (i, Part { counters, client }) in split.parts.iter().enumerate() {
                let r = self.record(d, counters, client, d.closed && i == last, clock);
                self.conn(&mut held, r)?;
            }
            plan.slots.push(SlotCommit::from(&*d));
        }

        let (overflow, stats) = self.kernel.read_overflow()?;
        self.overflow_total = overflow;
        let reported = self.kernel.overflow_reported()?;
        let overflow_delta = overflow.delta_since(&reported);
        if !overflow_delta.is_zero() {
            let r = OverflowRecord {
                ts: clock.unix_ms,
                counters: overflow_delta.into(),
            };
            self.overflow(&mut held, r)?;
            plan.overflow = Some(OverflowCommit {
                before: reported,
                after: overflow,
            });
        }
        let s = StatsRecord {
            conns_overflowed: stats[stat::CONNS_OVERFLOWED as usize],
            overflow_closed: stats[stat::OVERFLOW_CLOSED as usize],
            legacy_untracked: stats[stat::LEGACY_UNTRACKED as usize],
            unparsed_packets: stats[stat::UNPARSED_PACKETS as usize],
            stale_slot: stats[stat::STALE_SLOT as usize],
            placed_away: stats[stat::PLACED_AWAY as usize],
            stale_owners: stats[stat::STALE_OWNERS as usize],
            capacity: self.kernel.table.capacity(),
            // Closed slots in this batch are freed by the commit below.
            live: self.kernel.table.in_use() - deltas.iter().filter(|d| d.closed).count() as u32,
            attribution: AttributionStatsRecord {
                agent: self.attributor.stats.clone(),
                turn_events_lost: stats[stat::TURN_EVENTS_LOST as usize],
                annotations_lost: stats[stat::ANNOTATIONS_LOST as usize],
                annotations_untracked: stats[stat::ANNOTATIONS_UNTRACKED as usize],
            },
        };
        if self.last_stats.as_ref() != Some(&s) {
            self.sink.stats(clock.unix_ms, &s)?;
            self.last_stats = Some(s);
        }
        let flushed = self.make_durable(clock.unix_ms, held, &plan)?;
        self.sink.flush()?;
        if flushed == Flushed::Deferred {
            // Not kept: the table keeps the interval's bytes for the next read.
            self.attributor.deferred();
            return Ok(());
        }

        outflow_crashpoint::crash_point!("agent::before_kernel_commit");
        self.kernel.table.commit(&deltas, clock.boot_ns)?;
        outflow_crashpoint::crash_point!("agent::after_kernel_commit");
        self.attributor.committed();
        if !overflow_delta.is_zero() {
            self.kernel.set_overflow_reported(overflow)?;
        }
        if let Some(d) = &mut self.durability {
            d.committed()?;
        }
        Ok(())
    }

    /// A connection record: to the sink, or held until the durability step has kept its
    /// interval (a deferred interval is read again, and would otherwise be output twice).
    fn conn(&mut self, held: &mut Held, r: ConnRecord) -> Result<(), AgentError> {
        if self.durability.is_some() {
            held.conns.push(r);
        } else {
            self.sink.conn(&r)?;
        }
        Ok(())
    }

    /// The overflow record: to the sink, or held as connection records are.
    fn overflow(&mut self, held: &mut Held, r: OverflowRecord) -> Result<(), AgentError> {
        if self.durability.is_some() {
            held.overflow = Some(r);
        } else {
            self.sink.overflow(&r)?;
        }
        Ok(())
    }

    /// The durability step, if there is one: makes the interval durable with its commit plan,
    /// then outputs the records it held if it was kept, and the export record if it changed.
    fn make_durable(
        &mut self,
        ts: u64,
        held: Held,
        plan: &CommitPlan,
    ) -> Result<Flushed, AgentError> {
        let Some(durability) = &mut self.durability else {
            return Ok(Flushed::Kept);
        };
        let flushed = durability.make_durable(&Interval {
            ts,
            conns: &held.conns,
            overflow: held.overflow.as_ref(),
            plan,
        })?;
        if flushed == Flushed::Kept {
            for r in &held.conns {
                self.sink.conn(r)?;
            }
            if let Some(r) = &held.overflow {
                self.sink.overflow(r)?;
            }
        }
        if let Some(r) = durability.report() {
            self.sink.export(ts, &r)?;
        }
        Ok(flushed)
    }

    fn record(
        &mut self,
        d: &SlotDelta,
        counters: &Counters,
        client: &Client,
        closed: bool,
        clock: Clock,
    ) -> ConnRecord {
        let id = &d.identity;
        let owner = if id.role == agent_common::ROLE_SERVER {
            let dir = self.cgroups.dir(id.cgroup_id);
            self.listeners
                .owner(id.cgroup_id, dir.as_deref(), id.local_port)
        } else {
            None
        };
        let Counters {
            bytes_out,
            bytes_in,
            wire_bytes_out,
            wire_bytes_in,
            segments_out,
            segments_in,
        } = *counters;
        ConnRecord {
            ts: clock.unix_ms,
            conn_id: id.cookie,
            family: if id.remote_addr.is_ipv4() {
                "ipv4"
            } else {
                "ipv6"
            },
            local_addr: id.local_addr,
            local_port: id.local_port,
            remote_addr: id.remote_addr,
            remote_port: id.remote_port,
            client_addr: client.addr,
            client_id: client.id.clone(),
            client_source: client.source.as_wire(),
            role: Role::from_kernel(id.role),
            bytes_out,
            bytes_in,
            wire_bytes_out,
            wire_bytes_in,
            segments_out,
            segments_in,
            closed,
            cgroup: self.cgroups.path(id.cgroup_id),
            cgroup_id: id.cgroup_id,
            pid: owner.as_ref().map(|p| p.pid),
            comm: owner.map(|p| p.comm),
            first_seen: clock.unix_ms_of(id.first_seen_ns),
            last_seen: clock.unix_ms,
        }
    }
}
