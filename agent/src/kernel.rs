//! The kernel side, from userspace: checks the environment, loads the embedded programs (what
//! [`probe`] says this kernel allows), pins their maps and links under bpffs, adopts what an
//! earlier agent pinned, and removes it all.
//!
//! Pinned layout under the pin directory:
//! `maps/<NAME>` for every map and `links/<program>` for every attachment. Links keep the
//! programs attached while no agent runs, so counting never stops across a restart; a new agent
//! swaps its programs into the existing cgroup links atomically (`BPF_LINK_UPDATE`), so an
//! upgrade neither double counts nor misses a packet.
use std::{
    ffi::CString,
    fs, io,
    os::fd::{AsFd, AsRawFd, RawFd},
    path::{Path, PathBuf},
};

use agent_common::{AgentState, ConnSlot, KernelConfig, SLOT_GROUP, STATE_LAYOUT, SlotRef, names};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, MapInfo, RingBuf},
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockopt, RawTracePoint, SockOps,
        links::{FdLink, LinkError},
    },
};
use log::{info, warn};

use crate::{
    mounts::{self, PinFs},
    probe::{self, Operation, Plan, Verdict},
    table::ConnTable,
};

/// The compiled kernel programs, built by build.rs from agent-ebpf.
pub(crate) static PROGRAMS: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/outflow"));

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The process lacks a capability, or the kernel a feature ([`probe`]).
    #[error(transparent)]
    Unsupported(#[from] probe::Refusal),
    #[error(
        "no cgroup v2 file system is mounted (looked in /proc/mounts): mount one with `mount -t cgroup2 none /sys/fs/cgroup` or boot with systemd.unified_cgroup_hierarchy=1"
    )]
    NoCgroup2,
    #[error("cgroup {0} does not exist: give an existing cgroup v2 directory with --cgroup")]
    CgroupMissing(PathBuf),
    #[error("{0} is not a cgroup v2 directory: give a directory under the cgroup2 mount ({1})")]
    NotCgroup2(PathBuf, PathBuf),
    #[error("cannot mount {fs} at {path}: {source}")]
    Mount {
        fs: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{0} is not on a BPF file system: choose a pin_dir under /sys/fs/bpf")]
    PinDirNotBpffs(PathBuf),
    #[error(
        "the kernel refused to load the counting programs: {0} (outflow needs Linux 5.10 or later with cgroup v2: `outflow-agent check` shows what this kernel lacks; RUST_LOG=debug shows the verifier's log)"
    )]
    Load(String),
    #[error("cannot attach {program}: {reason}")]
    Attach {
        program: &'static str,
        reason: String,
    },
    #[error(
        "the state pinned in {dir} was made by an incompatible agent ({detail}): run `outflow-agent detach --pin-dir {dir}` first (counting restarts from zero)"
    )]
    Incompatible { dir: PathBuf, detail: String },
    #[error(
        "the state pinned in {dir} is attached to another cgroup ({pinned}); run `outflow-agent detach --pin-dir {dir}` first to attach to {wanted}"
    )]
    OtherCgroup {
        dir: PathBuf,
        pinned: String,
        wanted: String,
    },
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("{0}")]
    Map(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> KernelError {
    let what = what.into();
    move |source| KernelError::Io { what, source }
}

/// What the loader needs to know.
pub struct LoadSettings<'a> {
    pub cgroup: &'a Path,
    pub pin_dir: &'a Path,
    pub max_connections: u32,
    pub exclude_loopback: bool,
    /// Bytes captured at the start of each turn of an accepted connection (0: none).
    pub capture_bytes: u32,
    /// Size of the event ring buffer in bytes (a power of two, at least a page).
    pub ring_bytes: u32,
}

/// The loaded, attached programs and their maps.
pub struct Kernel {
    /// Kept so the maps and programs stay open while the agent runs.
    ebpf: Ebpf,
    pub table: ConnTable,
    /// True when this agent adopted state an earlier agent pinned.
    pub adopted: bool,
    pub cgroup_id: u64,
}

/// How often one kernel program ran, and for how long in all (counted by the kernel only
/// while `kernel.bpf_stats_enabled` is 1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgramRuns {
    pub program: String,
    pub runs: u64,
    pub time: std::time::Duration,
}

/// Whether the kernel counts program runs (`sysctl kernel.bpf_stats_enabled`).
pub fn bpf_stats_enabled() -> bool {
    fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").is_ok_and(|s| s.trim() == "1")
}

/// The cgroup2 mount point, from /proc/mounts.
pub fn cgroup2_mount() -> Result<PathBuf, KernelError> {
    mounts::cgroup2_mount()
        .map_err(io_err("read /proc/mounts"))?
        .ok_or(KernelError::NoCgroup2)
}

/// The cgroup id of a cgroup v2 directory: its inode number.
pub fn cgroup_id(dir: &Path) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt as _;
    Ok(fs::metadata(dir)?.ino())
}

impl Kernel {
    /// Run count and time of each of this agent's programs (the ones attached: an agent that
    /// adopted pinned state swapped its own programs in). A program whose info cannot be read
    /// is left out.
    pub fn program_runs(&self) -> Vec<ProgramRuns> {
        self.ebpf
            .programs()
            .filter_map(|(name, p)| {
                let info = p.info().ok()?;
                Some(ProgramRuns {
                    program: name.to_string(),
                    runs: info.run_count(),
                    time: info.run_time(),
                })
            })
            .collect()
    }
}

/// Resolves and checks the cgroup to attach to.
pub fn resolve_cgroup(requested: Option<&Path>) -> Result<PathBuf, KernelError> {
    let mount = cgroup2_mount()?;
    let dir = requested.map_or_else(|| mount.clone(), Path::to_path_buf);
    if !dir.is_dir() {
        return Err(KernelError::CgroupMissing(dir));
    }
    match mounts::fs_type(&dir) {
        Ok(mounts::CGROUP2_SUPER_MAGIC) => Ok(dir),
        Ok(_) => Err(KernelError::NotCgroup2(dir, mount)),
        Err(source) => Err(KernelError::Io {
            what: format!("statfs {}", dir.display()),
            source,
        }),
    }
}

/// The capabilities `op` needs (not the user: root with fewer capabilities is refused, another
/// user granted them is not).
pub fn require_capabilities(op: Operation<'_>) -> Result<(), KernelError> {
    Ok(probe::require_capabilities(op)?)
}

fn mount_fs(fs: &'static str, path: &Path) -> Result<(), KernelError> {
    let err = |source| KernelError::Mount {
        fs,
        path: path.into(),
        source,
    };
    fs::create_dir_all(path).map_err(err)?;
    let target = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| err(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    let fstype =
        CString::new(fs).map_err(|e| err(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    // SAFETY: valid C strings; no data argument.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(err(io::Error::last_os_error()));
    }
    info!("mounted {fs} at {}", path.display());
    Ok(())
}

/// Makes sure the pin directory is on bpffs, mounting /sys/fs/bpf when nothing is mounted there.
fn ensure_bpffs(pin_dir: &Path) -> Result<(), KernelError> {
    match mounts::pin_fs(pin_dir).map_err(io_err(format!("statfs {}", pin_dir.display())))? {
        PinFs::Bpffs => {}
        PinFs::MountDefault => mount_fs("bpf", Path::new(mounts::DEFAULT_BPFFS))?,
        PinFs::NotBpffs => return Err(KernelError::PinDirNotBpffs(pin_dir.into())),
    }
    for sub in ["maps", "links"] {
        let d = pin_dir.join(sub);
        fs::create_dir_all(&d).map_err(io_err(format!("create {}", d.display())))?;
    }
    Ok(())
}

fn map_pin(pin_dir: &Path, name: &str) -> PathBuf {
    pin_dir.join("maps").join(name)
}

fn link_pin(pin_dir: &Path, program: &str) -> PathBuf {
    pin_dir.join("links").join(program)
}

/// Pinned state an earlier agent left: `Some(capacity)` when it is complete and compatible.
fn inspect_pinned(pin_dir: &Path) -> Result<Option<u32>, KernelError> {
    let conns = map_pin(pin_dir, names::CONNS);
    let state = map_pin(pin_dir, names::AGENT_STATE);
    if !conns.exists() || !state.exists() {
        return Ok(None);
    }
    let incompatible = |detail: String| KernelError::Incompatible {
        dir: pin_dir.into(),
        detail,
    };
    let info = MapInfo::from_pin(&conns).map_err(|e| incompatible(format!("{e}")))?;
    if info.value_size() as usize != size_of::<ConnSlot>() {
        return Err(incompatible(format!(
            "connection slots of {} bytes, this agent uses {}",
            info.value_size(),
            size_of::<ConnSlot>()
        )));
    }
    let data = MapData::from_pin(&state).map_err(|e| incompatible(format!("{e}")))?;
    let arr: Array<MapData, AgentState> =
        Array::try_from(aya::maps::Map::Array(data)).map_err(|e| incompatible(format!("{e}")))?;
    let st = arr.get(&0, 0).map_err(|e| incompatible(format!("{e}")))?;
    if st.ready == 0 {
        // An agent died while setting up: nothing was attached yet, start afresh.
        return Ok(None);
    }
    if st.layout != STATE_LAYOUT {
        return Err(incompatible(format!(
            "layout {}, this agent uses {STATE_LAYOUT}",
            st.layout
        )));
    }
    Ok(Some(info.max_entries()))
}

/// Removes every pinned map (the links must be gone first for them to be freed).
fn remove_map_pins(pin_dir: &Path) -> Result<(), KernelError> {
    for name in names::ALL {
        let p = map_pin(pin_dir, name);
        match fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(KernelError::Io {
                    what: format!("remove {}", p.display()),
                    source: e,
                });
            }
        }
    }
    Ok(())
}

impl Kernel {
    /// Probes the kernel, then loads (or adopts) and attaches everything it allows.
    pub fn open(s: &LoadSettings<'_>) -> Result<Self, KernelError> {
        let plan = probe_kernel(s.pin_dir)?;
        if plan.raise_memlock {
            raise_memlock();
        }
        ensure_bpffs(s.pin_dir)?;
        let cgroup_id =
            cgroup_id(s.cgroup).map_err(io_err(format!("stat {}", s.cgroup.display())))?;

        let pinned_capacity = inspect_pinned(s.pin_dir)?;
        let adopted = pinned_capacity.is_some();
        if !adopted {
            // Leftovers of an agent that died before it was ready: start clean.
            remove_map_pins(s.pin_dir)?;
        }
        // Slots are placed by groups of SLOT_GROUP: the capacity is a multiple of it.
        let wanted = s.max_connections.next_multiple_of(SLOT_GROUP);
        let capacity = pinned_capacity.unwrap_or(wanted);
        if capacity != wanted {
            warn!(
                "keeping the pinned table's capacity {capacity} (max_connections {} applies after `outflow-agent detach`)",
                s.max_connections
            );
        }

        let mut loader = EbpfLoader::new();
        let pins: Vec<(&str, PathBuf)> = names::ALL
            .iter()
            .map(|n| (*n, map_pin(s.pin_dir, n)))
            .collect();
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        loader
            .map_max_entries(names::CONNS, capacity)
            .map_max_entries(names::CONN_HOT, capacity)
            .map_max_entries(names::SLOT_CLAIMS, capacity)
            .map_max_entries(names::LEGACY, legacy_entries(plan, capacity))
            .map_max_entries(names::EVENTS, s.ring_bytes);
        let mut ebpf = loader.load(PROGRAMS).map_err(|e| load_error("maps", &e))?;
        if !plan.close_tracepoint {
            fill_legacy(&mut ebpf)?;
        }

        let st = agent_state_map(&mut ebpf)?
            .get(&0, 0)
            .map_err(map_err("read AGENT_STATE"))?;
        if adopted && st.cgroup_id != cgroup_id {
            return Err(KernelError::OtherCgroup {
                dir: s.pin_dir.into(),
                pinned: format!("cgroup id {}", st.cgroup_id),
                wanted: s.cgroup.display().to_string(),
            });
        }

        {
            let map = ebpf
                .map_mut(names::CONFIG)
                .ok_or_else(|| missing(names::CONFIG))?;
            let mut config: Array<&mut MapData, KernelConfig> =
                Array::try_from(map).map_err(map_err("CONFIG"))?;
            let kc = KernelConfig {
                exclude_loopback: u32::from(s.exclude_loopback),
                capture_bytes: s.capture_bytes,
                slot_groups: capacity / SLOT_GROUP,
                _pad: 0,
            };
            config.set(0, kc, 0).map_err(map_err("write CONFIG"))?;
        }

        let claims: HashMap<MapData, u32, u32> = HashMap::try_from(
            ebpf.take_map(names::SLOT_CLAIMS)
                .ok_or_else(|| missing(names::SLOT_CLAIMS))?,
        )
        .map_err(map_err("SLOT_CLAIMS"))?;
        let conns = ebpf
            .take_map(names::CONNS)
            .ok_or_else(|| missing(names::CONNS))?;
        let hot = ebpf
            .take_map(names::CONN_HOT)
            .ok_or_else(|| missing(names::CONN_HOT))?;
        let table = ConnTable::map(conns, hot, claims, capacity)
            .map_err(|e| KernelError::Map(e.to_string()))?;
        if !adopted {
            let st = AgentState {
                layout: STATE_LAYOUT,
                ready: 1,
                cgroup_id,
                ..AgentState::default()
            };
            agent_state_map(&mut ebpf)?
                .set(0, st, 0)
                .map_err(map_err("write AGENT_STATE"))?;
        }

        attach_all(&mut ebpf, s.cgroup, s.pin_dir, plan)?;
        info!(
            "{} kernel state in {} (table of {capacity} connections), attached to {}",
            if adopted { "adopted" } else { "created" },
            s.pin_dir.display(),
            s.cgroup.display()
        );
        Ok(Self {
            ebpf,
            table,
            adopted,
            cgroup_id,
        })
    }

    /// Per-CPU sums of the overflow counters and the event counters.
    pub fn read_overflow(
        &self,
    ) -> Result<
        (
            agent_common::Counters,
            [u64; agent_common::STAT_COUNT as usize],
        ),
        KernelError,
    > {
        use aya::maps::PerCpuArray;
        let m = self
            .ebpf
            .map(names::OVERFLOW)
            .ok_or_else(|| missing(names::OVERFLOW))?;
        let ov: PerCpuArray<&MapData, agent_common::Counters> =
            PerCpuArray::try_from(m).map_err(map_err("OVERFLOW"))?;
        let mut total = agent_common::Counters::default();
        for c in ov.get(&0, 0).map_err(map_err("read OVERFLOW"))?.iter() {
            total = total.plus(c);
        }
        let m = self
            .ebpf
            .map(names::STATS)
            .ok_or_else(|| missing(names::STATS))?;
        let stats: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(m).map_err(map_err("STATS"))?;
        let mut out = [0u64; agent_common::STAT_COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            *slot = stats
                .get(&(i as u32), 0)
                .map_err(map_err("read STATS"))?
                .iter()
                .sum();
        }
        Ok((total, out))
    }

    /// The overflow counters already reported (kept in the pinned state).
    /// The ring buffer of turn and annotation events (once: the caller keeps it).
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>, KernelError> {
        let m = self
            .ebpf
            .take_map(names::EVENTS)
            .ok_or_else(|| missing(names::EVENTS))?;
        RingBuf::try_from(m).map_err(map_err("EVENTS"))
    }

    pub fn overflow_reported(&mut self) -> Result<agent_common::Counters, KernelError> {
        Ok(agent_state_map(&mut self.ebpf)?
            .get(&0, 0)
            .map_err(map_err("read AGENT_STATE"))?
            .overflow_reported)
    }

    pub fn set_overflow_reported(&mut self, c: agent_common::Counters) -> Result<(), KernelError> {
        let mut m = agent_state_map(&mut self.ebpf)?;
        let mut st = m.get(&0, 0).map_err(map_err("read AGENT_STATE"))?;
        st.overflow_reported = c;
        m.set(0, st, 0).map_err(map_err("write AGENT_STATE"))
    }
}

/// Runs the probe: refuses when the process or the kernel lacks what the agent needs, warns
/// (once) about what it will do without, and says what the loader does differently.
fn probe_kernel(pin_dir: &Path) -> Result<Plan, KernelError> {
    let report = probe::probe(pin_dir);
    match report.verdict() {
        Verdict::Refused(refusal) => return Err(refusal.into()),
        Verdict::Degraded(missing) => {
            for r in missing {
                if let probe::Need::Degrade { cost } = r.need {
                    warn!(
                        "this kernel ({}) lacks {}: {cost}",
                        report.release, r.feature
                    );
                }
            }
        }
        Verdict::Ready => {}
    }
    let unprobed: Vec<_> = report.unprobed().collect();
    if let Some((first, why)) = unprobed.first() {
        warn!(
            "could not probe {} of what the agent needs ({}: {why}; `outflow-agent check` lists them): going on as if present",
            unprobed.len(),
            first.feature
        );
    }
    Ok(report.plan())
}

/// Lifts RLIMIT_MEMLOCK, which kernels before 5.11 charge map memory to.
fn raise_memlock() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: a valid rlimit, read during the call only.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        warn!(
            "this kernel charges BPF maps to RLIMIT_MEMLOCK and the agent cannot lift it ({}): if loading fails with \"Operation not permitted\", raise it (systemd LimitMEMLOCK=infinity, ulimit -l unlimited) or grant CAP_SYS_RESOURCE",
            io::Error::last_os_error()
        );
    }
}

/// Entries of LEGACY, the connections that predate the agent by socket address, which only
/// the close tracepoint reads. Without the tracepoint it holds a single placeholder
/// ([`fill_legacy`]): the programs' inserts then all fail, and `legacy_untracked` counts them.
fn legacy_entries(plan: Plan, capacity: u32) -> u32 {
    if plan.close_tracepoint { capacity } else { 1 }
}

/// Fills LEGACY's one entry with a key no socket has (0), so that it stays full.
fn fill_legacy(ebpf: &mut Ebpf) -> Result<(), KernelError> {
    let map = ebpf
        .map_mut(names::LEGACY)
        .ok_or_else(|| missing(names::LEGACY))?;
    let mut legacy: HashMap<&mut MapData, u64, SlotRef> =
        HashMap::try_from(map).map_err(map_err("LEGACY"))?;
    legacy
        .insert(0, SlotRef::default(), 0)
        .map_err(map_err("write LEGACY"))
}

fn agent_state_map(ebpf: &mut Ebpf) -> Result<Array<&mut MapData, AgentState>, KernelError> {
    let m = ebpf
        .map_mut(names::AGENT_STATE)
        .ok_or_else(|| missing(names::AGENT_STATE))?;
    Array::try_from(m).map_err(map_err("AGENT_STATE"))
}

fn missing(name: &str) -> KernelError {
    KernelError::Map(format!("map {name} missing from the embedded programs"))
}

fn map_err<E: std::error::Error>(what: &'static str) -> impl FnOnce(E) -> KernelError {
    move |e| KernelError::Map(format!("{what}: {}", chain(&e)))
}

/// An error and its sources on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s.replace('\n', " ")
}

/// A load failure in one line: the verifier's log goes to the debug log, its last words here.
fn load_error(what: &str, e: &dyn std::error::Error) -> KernelError {
    let full = chain(e);
    let Some((head, log)) = full.split_once("Verifier output:") else {
        return KernelError::Load(format!("{what}: {full}"));
    };
    log::debug!("verifier log of {what}: {log}");
    let tail: String = log
        .split(" ; ")
        .filter(|l| !l.contains("verification time") && !l.trim().is_empty())
        .last()
        .unwrap_or("")
        .chars()
        .take(200)
        .collect();
    KernelError::Load(format!(
        "{what}: {}; verifier: {}",
        head.trim().trim_end_matches('.'),
        tail.trim()
    ))
}

/// The programs and where each goes.
const EGRESS: &str = "count_egress";
const INGRESS: &str = "count_ingress";
const SOCK_OPS: &str = "sock_ops";
const SOCK_CLOSE: &str = "sock_close";
const ANNOTATE: &str = "annotate";

fn attach_all(
    ebpf: &mut Ebpf,
    cgroup: &Path,
    pin_dir: &Path,
    plan: Plan,
) -> Result<(), KernelError> {
    let cg = fs::File::open(cgroup).map_err(io_err(format!("open {}", cgroup.display())))?;
    let attach_err = |program: &'static str| {
        move |e: &dyn std::error::Error| KernelError::Attach {
            program,
            reason: chain(e),
        }
    };

    for (name, kind) in [
        (EGRESS, CgroupSkbAttachType::Egress),
        (INGRESS, CgroupSkbAttachType::Ingress),
    ] {
        let prog: &mut CgroupSkb = program(ebpf, name)?;
        prog.load().map_err(|e| load_error(name, &e))?;
        let fd = prog
            .fd()
            .map_err(|e| attach_err(name)(&e))?
            .as_fd()
            .as_raw_fd();
        pin_or_replace(name, pin_dir, fd, || {
            let id = prog
                .attach(&cg, kind, CgroupAttachMode::Single)
                .map_err(|e| attach_err(name)(&e))?;
            prog.take_link(id)
                .map_err(|e| attach_err(name)(&e))?
                .try_into()
                .map_err(|e: LinkError| attach_err(name)(&e))
        })?;
    }

    {
        let prog: &mut CgroupSockopt = program(ebpf, ANNOTATE)?;
        prog.load().map_err(|e| load_error(ANNOTATE, &e))?;
        let fd = prog
            .fd()
            .map_err(|e| attach_err(ANNOTATE)(&e))?
            .as_fd()
            .as_raw_fd();
        // aya 0.14 cannot turn a sockopt link into a pinnable FdLink: link and pin by bpf(2).
        let pin = link_pin(pin_dir, ANNOTATE);
        if pin.exists() {
            replace_in_link(&pin, fd, ANNOTATE)?;
        } else {
            const BPF_CGROUP_SETSOCKOPT: u32 = 22;
            let link = bpf_link_create(fd, cg.as_raw_fd(), BPF_CGROUP_SETSOCKOPT)
                .and_then(|link| bpf_obj_pin(&link, &pin))
                .map_err(|e| KernelError::Attach {
                    program: ANNOTATE,
                    reason: e.to_string(),
                });
            link?;
        }
    }

    {
        let prog: &mut SockOps = program(ebpf, SOCK_OPS)?;
        prog.load().map_err(|e| load_error(SOCK_OPS, &e))?;
        let fd = prog
            .fd()
            .map_err(|e| attach_err(SOCK_OPS)(&e))?
            .as_fd()
            .as_raw_fd();
        pin_or_replace(SOCK_OPS, pin_dir, fd, || {
            let id = prog
                .attach(&cg, CgroupAttachMode::Single)
                .map_err(|e| attach_err(SOCK_OPS)(&e))?;
            prog.take_link(id)
                .map_err(|e| attach_err(SOCK_OPS)(&e))?
                .try_into()
                .map_err(|e: LinkError| attach_err(SOCK_OPS)(&e))
        })?;
    }

    if plan.close_tracepoint {
        // Raw tracepoint links cannot swap programs: attach the new one, then drop the old pin
        // (marking a slot closed twice is harmless), then pin the new one in its place.
        let prog: &mut RawTracePoint = program(ebpf, SOCK_CLOSE)?;
        prog.load().map_err(|e| load_error(SOCK_CLOSE, &e))?;
        let id = prog
            .attach(probe::CLOSE_TRACEPOINT)
            .map_err(|e| attach_err(SOCK_CLOSE)(&e))?;
        let link: FdLink = prog
            .take_link(id)
            .map_err(|e| attach_err(SOCK_CLOSE)(&e))?
            .into();
        let pin = link_pin(pin_dir, SOCK_CLOSE);
        match fs::remove_file(&pin) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(KernelError::Io {
                    what: format!("remove {}", pin.display()),
                    source: e,
                });
            }
        }
        link.pin(&pin).map_err(|e| attach_err(SOCK_CLOSE)(&e))?;
    }
    Ok(())
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, KernelError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let p = ebpf.program_mut(name).ok_or_else(|| {
        KernelError::Load(format!("program {name} missing from the embedded object"))
    })?;
    p.try_into().map_err(|e: aya::programs::ProgramError| {
        KernelError::Load(format!("{name}: {}", chain(&e)))
    })
}

/// Attaches a cgroup program and pins its link; when an earlier agent left the link pinned,
/// swaps this program into it instead (`attach` is then not called).
fn pin_or_replace(
    name: &'static str,
    pin_dir: &Path,
    prog_fd: RawFd,
    attach: impl FnOnce() -> Result<FdLink, KernelError>,
) -> Result<(), KernelError> {
    let pin = link_pin(pin_dir, name);
    if pin.exists() {
        return replace_in_link(&pin, prog_fd, name);
    }
    attach()?.pin(&pin).map_err(|e| KernelError::Attach {
        program: name,
        reason: chain(&e),
    })?;
    Ok(())
}

/// Swaps the program behind a pinned link (`BPF_LINK_UPDATE`): atomic, so no packet is counted
/// twice or missed.
fn replace_in_link(pin: &Path, prog: RawFd, name: &'static str) -> Result<(), KernelError> {
    // aya does not expose a pinned link's fd, nor BPF_LINK_UPDATE: both by bpf(2) directly.
    let fd = bpf_obj_get(pin).map_err(|e| KernelError::Attach {
        program: name,
        reason: format!("open pinned link {}: {e}", pin.display()),
    })?;
    #[repr(C)]
    struct LinkUpdate {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let mut attr = [0u8; 128];
    let upd = LinkUpdate {
        link_fd: fd.as_raw_fd() as u32,
        new_prog_fd: prog as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    // SAFETY: LinkUpdate is plain data that fits in the buffer.
    unsafe { std::ptr::write_unaligned(attr.as_mut_ptr().cast::<LinkUpdate>(), upd) };
    const BPF_LINK_UPDATE: libc::c_long = 29;
    // SAFETY: bpf(2) with a zeroed attr holding the link_update fields.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_LINK_UPDATE, attr.as_ptr(), attr.len()) };
    if rc != 0 {
        return Err(KernelError::Attach {
            program: name,
            reason: format!(
                "replace the program in {}: {}",
                pin.display(),
                io::Error::last_os_error()
            ),
        });
    }
    Ok(())
}

/// `BPF_LINK_CREATE` of a cgroup program (flags 0).
fn bpf_link_create(
    prog: RawFd,
    cgroup: RawFd,
    attach_type: u32,
) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd as _;
    let mut attr = [0u8; 128];
    // union bpf_attr for BPF_LINK_CREATE: __u32 prog_fd; __u32 target_fd; __u32 attach_type;
    // __u32 flags.
    attr[..4].copy_from_slice(&(prog as u32).to_ne_bytes());
    attr[4..8].copy_from_slice(&(cgroup as u32).to_ne_bytes());
    attr[8..12].copy_from_slice(&attach_type.to_ne_bytes());
    const BPF_LINK_CREATE: libc::c_long = 28;
    // SAFETY: bpf(2) with a zeroed attr holding the link_create fields.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_LINK_CREATE, attr.as_ptr(), attr.len()) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd owned by us.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// `BPF_OBJ_PIN`: pins `fd` at `path` on bpffs.
fn bpf_obj_pin(fd: &std::os::fd::OwnedFd, path: &Path) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = [0u8; 128];
    // union bpf_attr for BPF_OBJ_PIN: __aligned_u64 pathname; __u32 bpf_fd; __u32 file_flags.
    attr[..8].copy_from_slice(&(c.as_ptr() as u64).to_ne_bytes());
    attr[8..12].copy_from_slice(&(fd.as_raw_fd() as u32).to_ne_bytes());
    const BPF_OBJ_PIN: libc::c_long = 6;
    // SAFETY: bpf(2) with a valid path pointer that outlives the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_PIN, attr.as_ptr(), attr.len()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn bpf_obj_get(path: &Path) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd as _;
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = [0u8; 128];
    // union bpf_attr for BPF_OBJ_GET: __aligned_u64 pathname; __u32 bpf_fd; __u32 file_flags.
    attr[..8].copy_from_slice(&(c.as_ptr() as u64).to_ne_bytes());
    const BPF_OBJ_GET: libc::c_long = 7;
    // SAFETY: bpf(2) with a valid path pointer that outlives the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET, attr.as_ptr(), attr.len()) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd owned by us.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// Detaches the pinned link at `pin` now (BPF_LINK_DETACH, Linux 5.9), rather than when the
/// kernel gets round to releasing it after its pin is gone (a deferred work item). Links that
/// cannot be detached that way (a raw tracepoint's link) go when their pin does.
fn detach_link(pin: &Path) {
    use std::os::fd::AsRawFd as _;
    let Ok(fd) = bpf_obj_get(pin) else {
        return;
    };
    let mut attr = [0u8; 128];
    // union bpf_attr for BPF_LINK_DETACH: __u32 link_fd.
    attr[..4].copy_from_slice(&(fd.as_raw_fd() as u32).to_ne_bytes());
    const BPF_LINK_DETACH: libc::c_long = 34;
    // SAFETY: bpf(2) with an attribute buffer that outlives the call; the answer is not needed.
    let _ = unsafe { libc::syscall(libc::SYS_bpf, BPF_LINK_DETACH, attr.as_ptr(), attr.len()) };
}

/// Removes everything the agent pinned and attached under `pin_dir`, the programs detached from
/// the cgroup by the time it returns. Returns what it removed.
pub fn detach(pin_dir: &Path) -> Result<Vec<PathBuf>, KernelError> {
    require_capabilities(Operation::Detach)?;
    let mut removed = Vec::new();
    for sub in ["links", "maps"] {
        let dir = pin_dir.join(sub);
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => {
                return Err(KernelError::Io {
                    what: format!("read {}", dir.display()),
                    source: e,
                });
            }
        };
        for entry in entries {
            let p = entry
                .map_err(io_err(format!("read {}", dir.display())))?
                .path();
            if sub == "links" {
                detach_link(&p);
            }
            fs::remove_file(&p).map_err(io_err(format!("remove {}", p.display())))?;
            removed.push(p);
        }
        let _ = fs::remove_dir(&dir);
    }
    let _ = fs::remove_dir(pin_dir);
    Ok(removed)
}
