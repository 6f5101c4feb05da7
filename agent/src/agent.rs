//! The read loop: each interval, read the table, emit what changed, then commit it.
use std::path::PathBuf;

use agent_common::{Counters, stat};

use crate::{
    config::Config,
    enrich::{CgroupNames, Listeners},
    filter::Filter,
    kernel::{self, Kernel, KernelError, LoadSettings},
    record::{ConnRecord, OverflowRecord, Role, Sink, StatsRecord},
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
    last_stats: Option<StatsRecord>,
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
    pub fn start(cfg: &Config, mut sink: Box<dyn Sink + Send>) -> Result<Self, AgentError> {
        kernel::require_root()?;
        let mount = kernel::cgroup2_mount()?;
        let cgroup = kernel::resolve_cgroup(cfg.cgroup.as_deref())?;
        let mut kernel = Kernel::open(&LoadSettings {
            cgroup: &cgroup,
            pin_dir: &cfg.pin_dir,
            max_connections: cfg.max_connections,
            exclude_loopback: !cfg.filter.include_loopback,
        })?;
        let rel = cgroup.strip_prefix(&mount).map_or_else(
            |_| cgroup.display().to_string(),
            |r| format!("/{}", r.display()),
        );
        // A previous agent may have made an interval durable and died before committing it.
        // (Without adopted state there is nothing to redo: that table is gone.)
        if let Some(plan) = sink.recover()? {
            if kernel.adopted {
                redo(&mut kernel, &plan)?;
            }
            sink.committed()?;
        }
        sink.started(
            &rel,
            &cfg.pin_dir.display().to_string(),
            kernel.adopted,
            kernel.table.capacity(),
        )?;
        Ok(Self {
            kernel,
            cgroups: CgroupNames::new(mount, PathBuf::from(&cgroup)),
            listeners: Listeners::default(),
            filter: Filter::new(cfg.filter.clone()),
            sink,
            last_stats: None,
        })
    }

    /// One interval: emit every changed or closed connection, the overflow, the stats; flush;
    /// then record what was emitted as reported (so a crash repeats rather than loses; a sink
    /// that keeps the commit plan with its durable records lets the next agent finish the
    /// commit instead, so nothing is repeated either).
    pub fn poll(&mut self) -> Result<(), AgentError> {
        let clock = Clock::now();
        self.sink.begin(clock.unix_ms)?;
        let deltas = self.kernel.table.collect();
        let mut plan = CommitPlan::default();
        for d in &deltas {
            if self
                .filter
                .admits(d.identity.local_port, d.identity.remote_addr)
            {
                let r = self.record(d, clock);
                self.sink.conn(&r)?;
                plan.slots.push(SlotCommit::from(d));
            }
        }

        let (overflow, stats) = self.kernel.read_overflow()?;
        let reported = self.kernel.overflow_reported()?;
        let overflow_delta = overflow.delta_since(&reported);
        if !overflow_delta.is_zero() {
            self.sink.overflow(&OverflowRecord {
                ts: clock.unix_ms,
                counters: overflow_delta.into(),
            })?;
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
            capacity: self.kernel.table.capacity(),
            // Closed slots in this batch are freed by the commit below.
            live: self.kernel.table.in_use() - deltas.iter().filter(|d| d.closed).count() as u32,
        };
        if self.last_stats.as_ref() != Some(&s) {
            self.sink.stats(clock.unix_ms, &s)?;
            self.last_stats = Some(s);
        }
        self.sink.commit_plan(&plan)?;
        self.sink.flush()?;

        self.kernel.table.commit(&deltas, clock.boot_ns)?;
        if !overflow_delta.is_zero() {
            self.kernel.set_overflow_reported(overflow)?;
        }
        self.sink.committed()?;
        Ok(())
    }

    fn record(&mut self, d: &SlotDelta, clock: Clock) -> ConnRecord {
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
        } = d.delta;
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
            role: Role::from_kernel(id.role),
            bytes_out,
            bytes_in,
            wire_bytes_out,
            wire_bytes_in,
            segments_out,
            segments_in,
            closed: d.closed,
            cgroup: self.cgroups.path(id.cgroup_id),
            cgroup_id: id.cgroup_id,
            pid: owner.as_ref().map(|p| p.pid),
            comm: owner.map(|p| p.comm),
            first_seen: clock.unix_ms_of(id.first_seen_ns),
            last_seen: clock.unix_ms,
        }
    }
}
