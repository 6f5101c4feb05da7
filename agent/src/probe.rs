//! What the running kernel offers the agent, and what the agent does about it.
//!
//! [`REQUIREMENTS`] lists what the agent uses: each kernel feature and capability, what it is
//! needed for, the first Linux release that has it, and what the agent does without it
//! ([`Need`]): refuse to start, start without a part, or nothing. [`probe`] finds out what this
//! kernel and this process have: with aya's probes where aya has one (a two-instruction program
//! or a one-entry map each, about thirty system calls in all) and by hand elsewhere.
//! [`Report::verdict`] decides, in one line when it refuses; [`Report::plan`] is what the
//! loader does differently. The agent probes at every start, before it loads anything;
//! `outflow-agent check` prints the report.
use std::{
    ffi::CStr,
    fs, io,
    os::fd::{FromRawFd as _, OwnedFd},
    path::Path,
};

use aya::{
    maps::MapType,
    programs::{ProgramError, ProgramType},
    sys::{BpfHelper, SyscallError, is_helper_supported, is_map_supported, is_program_supported},
};

use crate::mounts::{self, PinFs};

/// The oldest Linux release the agent supports (5.10, 6.1 and 6.12 are tested).
pub const MIN_LINUX: &str = "5.10";

/// The tracepoint whose raw form says a connection closed (`sock_close` attaches to it).
pub const CLOSE_TRACEPOINT: &str = "inet_sock_set_state";

/// One thing the agent needs, or can use, from the kernel or the process.
#[derive(Debug)]
pub struct Requirement {
    /// What the kernel or the process must have, e.g. "map type sk_storage".
    pub feature: &'static str,
    /// What the agent uses it for.
    pub needed_for: &'static str,
    /// The first Linux release that has it ("-" for capabilities: every kernel knows them, or
    /// CAP_SYS_ADMIN stands in for them).
    pub since: &'static str,
    /// What the agent does without it.
    pub need: Need,
    check: Check,
}

/// What the agent does without a [`Requirement`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// It refuses to start.
    Refuse,
    /// It starts without the part that needs it, at this cost.
    Degrade { cost: &'static str },
    /// Nothing that matters: `without` says what changes.
    Info { without: &'static str },
}

/// What a probe found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Present.
    Ok,
    /// Absent, and needed.
    Missing,
    /// Absent, and not needed (an [`Need::Info`] feature, or a capability this host does not
    /// call for).
    NotNeeded,
    /// Not probed: why.
    NotProbed(String),
}

impl Outcome {
    /// The word `outflow-agent check` shows.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Missing => "missing",
            Outcome::NotNeeded => "absent (not needed)",
            Outcome::NotProbed(_) => "not probed",
        }
    }
}

/// The capabilities the agent checks for, each with what may stand in for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Privilege {
    /// Loading programs, creating maps, any `bpf(2)` command.
    Bpf,
    /// Loading cgroup programs (cgroup_skb, sock_ops, cgroup_sockopt).
    NetAdmin,
    /// The verifier's pointer rule: a program may store a pointer (a socket's address) into a
    /// map only with it; tracing programs (the close tracepoint) need it too.
    Perfmon,
    /// Mounting bpffs, when nothing is mounted at /sys/fs/bpf.
    MountBpffs,
}

// Capability numbers (include/uapi/linux/capability.h).
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

impl Privilege {
    /// Whether the effective set `eff` (a bit per capability) holds it.
    fn held(self, eff: u64) -> bool {
        let has = |cap: u32| eff & (1 << cap) != 0;
        match self {
            Privilege::Bpf => has(CAP_BPF) || has(CAP_SYS_ADMIN),
            Privilege::NetAdmin => has(CAP_NET_ADMIN) || has(CAP_SYS_ADMIN),
            Privilege::Perfmon => has(CAP_PERFMON) || has(CAP_SYS_ADMIN),
            Privilege::MountBpffs => has(CAP_SYS_ADMIN),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Privilege::Bpf => "CAP_BPF (or CAP_SYS_ADMIN)",
            Privilege::NetAdmin => "CAP_NET_ADMIN (or CAP_SYS_ADMIN)",
            Privilege::Perfmon => "CAP_PERFMON (or CAP_SYS_ADMIN)",
            Privilege::MountBpffs => "CAP_SYS_ADMIN",
        }
    }
}

/// How a requirement is probed.
#[derive(Clone, Copy, Debug)]
enum Check {
    Capability(Privilege),
    Cgroup2,
    Program(ProgramType),
    Map(MapType),
    Helper(ProgramType, BpfHelper),
    /// `BPF_MAP_CREATE` of an array with `BPF_F_MMAPABLE`.
    MmapableArray,
    /// `BPF_LINK_CREATE` with a file descriptor that cannot be open: `EBADF` if the command
    /// exists, `EINVAL` if it does not.
    LinkCreate,
    /// `BPF_LINK_DETACH`, the same way.
    LinkDetach,
    /// A raw tracepoint's BPF entry (`__bpf_trace_<name>`) in /proc/kallsyms, which lists
    /// function names even when it hides their addresses; else the tracepoint's tracefs
    /// directory `events/<system>/<name>`.
    RawTracepoint {
        system: &'static str,
        name: &'static str,
    },
    /// Map memory charged to the memory cgroup rather than to RLIMIT_MEMLOCK.
    MemcgAccounting,
    KernelBtf,
}

impl Check {
    /// The probe is a `bpf(2)` call, which fails with EPERM without the capabilities.
    fn uses_bpf(self) -> bool {
        matches!(
            self,
            Check::Program(_)
                | Check::Map(_)
                | Check::Helper(..)
                | Check::MmapableArray
                | Check::LinkCreate
                | Check::LinkDetach
                | Check::MemcgAccounting
        )
    }
}

const fn req(
    feature: &'static str,
    needed_for: &'static str,
    since: &'static str,
    need: Need,
    check: Check,
) -> Requirement {
    Requirement {
        feature,
        needed_for,
        since,
        need,
        check,
    }
}

const CAPTURE: &str = "capturing the start of each request (client attribution)";
const LEGACY_CLOSE_COST: &str = "closes of connections that predate the agent are not seen: their bytes are still counted exactly, but their slots stay taken until `outflow-agent detach` (the legacy_untracked stat counts them)";

/// Everything the agent uses, in the order the report shows and a refusal picks the first
/// missing one: the process's capabilities (without them nothing else can be probed), then
/// the kernel's features from the most basic up. The helpers are those each program calls,
/// checked against the compiled object.
pub static REQUIREMENTS: &[Requirement] = {
    use BpfHelper as H;
    use Check as C;
    use Need::Refuse;
    use ProgramType as P;
    &[
        req(
            "capability CAP_BPF (or CAP_SYS_ADMIN)",
            "loading the programs and creating their maps",
            "-",
            Refuse,
            C::Capability(Privilege::Bpf),
        ),
        req(
            "capability CAP_NET_ADMIN (or CAP_SYS_ADMIN)",
            "loading cgroup programs and attaching them",
            "-",
            Refuse,
            C::Capability(Privilege::NetAdmin),
        ),
        req(
            "capability CAP_PERFMON (or CAP_SYS_ADMIN)",
            "storing socket addresses in maps (the verifier's pointer rule), the close tracepoint",
            "-",
            Refuse,
            C::Capability(Privilege::Perfmon),
        ),
        req(
            "capability CAP_SYS_ADMIN",
            "mounting bpffs at /sys/fs/bpf (only when nothing is mounted there)",
            "-",
            Refuse,
            C::Capability(Privilege::MountBpffs),
        ),
        req(
            "cgroup v2",
            "attaching the programs to a cgroup",
            "4.5",
            Refuse,
            C::Cgroup2,
        ),
        req(
            "program type cgroup_skb",
            "counting every packet",
            "4.10",
            Refuse,
            C::Program(P::CgroupSkb),
        ),
        req(
            "program type sock_ops",
            "seeing connections open and close",
            "4.13",
            Refuse,
            C::Program(P::SockOps),
        ),
        req(
            "program type cgroup_sockopt",
            "the annotation API (setsockopt SOL_OUTFLOW)",
            "5.3",
            Refuse,
            C::Program(P::CgroupSockopt),
        ),
        req(
            "program type raw_tracepoint",
            "seeing closes of connections that predate the agent",
            "4.17",
            Refuse,
            C::Program(P::RawTracePoint),
        ),
        req(
            "BPF links for cgroups (BPF_LINK_CREATE)",
            "keeping counting across agent restarts",
            "5.7",
            Refuse,
            C::LinkCreate,
        ),
        req(
            "mmap-able arrays (BPF_F_MMAPABLE)",
            "reading the connection table without a system call per slot",
            "5.5",
            Refuse,
            C::MmapableArray,
        ),
        req(
            "map type array",
            "the connection table and the settings",
            "3.19",
            Refuse,
            C::Map(MapType::Array),
        ),
        req(
            "map type percpu_array",
            "the overflow and event counters",
            "4.6",
            Refuse,
            C::Map(MapType::PerCpuArray),
        ),
        req(
            "map type hash",
            "slot claims, connections that predate the agent",
            "3.19",
            Refuse,
            C::Map(MapType::Hash),
        ),
        req(
            "map type sk_storage",
            "per-socket state",
            "5.2",
            Refuse,
            C::Map(MapType::SkStorage),
        ),
        req(
            "map type ringbuf",
            "client attribution events",
            "5.8",
            Refuse,
            C::Map(MapType::RingBuf),
        ),
        req(
            "helper bpf_get_socket_cookie from cgroup_skb",
            "identifying connections that predate the agent",
            "4.12",
            Refuse,
            C::Helper(P::CgroupSkb, H::BPF_FUNC_get_socket_cookie),
        ),
        req(
            "helper bpf_ktime_get_boot_ns from cgroup_skb",
            "the start time of connections that predate the agent",
            "5.8",
            Refuse,
            C::Helper(P::CgroupSkb, H::BPF_FUNC_ktime_get_boot_ns),
        ),
        req(
            "helper bpf_ringbuf_output from cgroup_skb",
            CAPTURE,
            "5.8",
            Refuse,
            C::Helper(P::CgroupSkb, H::BPF_FUNC_ringbuf_output),
        ),
        req(
            "helper bpf_ringbuf_query from cgroup_skb",
            "waking the agent only when events wait",
            "5.8",
            Refuse,
            C::Helper(P::CgroupSkb, H::BPF_FUNC_ringbuf_query),
        ),
        req(
            "helper bpf_sk_fullsock from cgroup_skb",
            "adopting connections that predate the agent",
            "5.1",
            Refuse,
            C::Helper(P::CgroupSkb, H::BPF_FUNC_sk_fullsock),
        ),
        req(
            "helper bpf_sk_storage_get from cgroup_skb",
            "per-socket state",
            "5.2",
            Refuse,
            C::Helper(P::CgroupSkb, H::BPF_FUNC_sk_storage_get),
        ),
        req(
            "helper bpf_skb_cgroup_id from cgroup_skb",
            "the cgroup of each connection",
            "5.3",
            Refuse,
            C::Helper(P::CgroupSkb, H::BPF_FUNC_skb_cgroup_id),
        ),
        req(
            "helper bpf_skb_load_bytes from cgroup_skb",
            CAPTURE,
            "4.10",
            Refuse,
            C::Helper(P::CgroupSkb, H::BPF_FUNC_skb_load_bytes),
        ),
        req(
            "helper bpf_tcp_sock from cgroup_skb",
            "where counting starts for connections that predate the agent",
            "5.1",
            Refuse,
            C::Helper(P::CgroupSkb, H::BPF_FUNC_tcp_sock),
        ),
        req(
            "helper bpf_get_socket_cookie from sock_ops",
            "identifying new connections",
            "4.19",
            Refuse,
            C::Helper(P::SockOps, H::BPF_FUNC_get_socket_cookie),
        ),
        req(
            "helper bpf_ktime_get_boot_ns from sock_ops",
            "the start time of new connections",
            "5.8",
            Refuse,
            C::Helper(P::SockOps, H::BPF_FUNC_ktime_get_boot_ns),
        ),
        req(
            "helper bpf_sk_storage_get from sock_ops",
            "per-socket state",
            "5.3",
            Refuse,
            C::Helper(P::SockOps, H::BPF_FUNC_sk_storage_get),
        ),
        req(
            "helper bpf_sk_storage_delete from sock_ops",
            "freeing per-socket state at close",
            "5.3",
            Refuse,
            C::Helper(P::SockOps, H::BPF_FUNC_sk_storage_delete),
        ),
        req(
            "helper bpf_sock_ops_cb_flags_set from sock_ops",
            "seeing connections close",
            "4.16",
            Refuse,
            C::Helper(P::SockOps, H::BPF_FUNC_sock_ops_cb_flags_set),
        ),
        req(
            "helper bpf_sk_storage_get from cgroup_sockopt",
            "finding an annotated socket's connection",
            "5.3",
            Refuse,
            C::Helper(P::CgroupSockopt, H::BPF_FUNC_sk_storage_get),
        ),
        req(
            "helper bpf_ringbuf_output from cgroup_sockopt",
            "passing annotations to the agent",
            "5.8",
            Refuse,
            C::Helper(P::CgroupSockopt, H::BPF_FUNC_ringbuf_output),
        ),
        req(
            "helper bpf_ringbuf_query from cgroup_sockopt",
            "passing annotations to the agent",
            "5.8",
            Refuse,
            C::Helper(P::CgroupSockopt, H::BPF_FUNC_ringbuf_query),
        ),
        req(
            "raw tracepoint inet_sock_set_state",
            "seeing closes of connections that predate the agent",
            "4.16",
            Need::Degrade {
                cost: LEGACY_CLOSE_COST,
            },
            C::RawTracepoint {
                system: "sock",
                name: CLOSE_TRACEPOINT,
            },
        ),
        req(
            "BPF_LINK_DETACH",
            "detaching at once on `outflow-agent detach`",
            "5.9",
            Need::Info {
                without: "`outflow-agent detach` removes the pins, and the kernel detaches the programs a moment later",
            },
            C::LinkDetach,
        ),
        req(
            "map memory charged to cgroups",
            "loading without raising RLIMIT_MEMLOCK",
            "5.11",
            Need::Info {
                without: "the agent raises RLIMIT_MEMLOCK before it loads (which needs CAP_SYS_RESOURCE or a high enough limit)",
            },
            C::MemcgAccounting,
        ),
        req(
            "kernel BTF (/sys/kernel/btf/vmlinux)",
            "nothing: the programs use no CO-RE relocations",
            "5.4",
            Need::Info { without: "nothing" },
            C::KernelBtf,
        ),
    ]
};

/// What the probe found, for every [`REQUIREMENTS`] entry in order.
#[derive(Debug)]
pub struct Report {
    /// The kernel release (`uname -r`).
    pub release: String,
    pub findings: Vec<Finding>,
}

#[derive(Debug)]
pub struct Finding {
    pub requirement: &'static Requirement,
    pub outcome: Outcome,
}

/// Whether the agent starts.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Ready,
    /// It starts, without the parts these [`Need::Degrade`] requirements serve.
    Degraded(Vec<&'static Requirement>),
    Refused(Refusal),
}

impl PartialEq for Requirement {
    fn eq(&self, other: &Self) -> bool {
        self.feature == other.feature
    }
}
impl Eq for Requirement {}

/// Why the agent does not start, in one line that says what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "missing {}: needed for {}; run as root or grant them (systemd AmbientCapabilities=, Kubernetes securityContext.capabilities.add)",
        capability_list(.names),
        .uses.join("; ")
    )]
    Capabilities {
        names: Vec<&'static str>,
        uses: Vec<&'static str>,
    },
    #[error(
        "this kernel ({release}) lacks {feature} (needed for {needed_for}; Linux {since} or later); outflow-agent needs Linux {MIN_LINUX} or later"
    )]
    Kernel {
        release: String,
        feature: &'static str,
        needed_for: &'static str,
        since: &'static str,
    },
}

fn capability_list(names: &[&str]) -> String {
    let noun = if names.len() == 1 {
        "capability"
    } else {
        "capabilities"
    };
    format!("{noun} {}", names.join(", "))
}

impl Refusal {
    fn capabilities(missing: &[Privilege]) -> Self {
        let uses = missing
            .iter()
            .filter_map(|p| {
                REQUIREMENTS
                    .iter()
                    .find(|r| matches!(r.check, Check::Capability(q) if q == *p))
                    .map(|r| r.needed_for)
            })
            .collect();
        Refusal::Capabilities {
            names: missing.iter().map(|p| p.name()).collect(),
            uses,
        }
    }
}

/// What the loader does differently on this kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Load `sock_close` and attach it to the `inet_sock_set_state` raw tracepoint (without
    /// it, closes of connections that predate the agent are not seen).
    pub close_tracepoint: bool,
    /// Raise RLIMIT_MEMLOCK before loading: the kernel charges map memory to it.
    pub raise_memlock: bool,
}

impl Report {
    /// Refused when a capability or a required feature is missing (capabilities first: without
    /// them the kernel was not probed); degraded when a [`Need::Degrade`] feature is. What
    /// could not be probed is taken to be there (loading will say if it is not).
    pub fn verdict(&self) -> Verdict {
        let missing = || {
            self.findings
                .iter()
                .filter(|f| f.outcome == Outcome::Missing)
        };
        let privileges: Vec<Privilege> = missing()
            .filter_map(|f| match f.requirement.check {
                Check::Capability(p) => Some(p),
                _ => None,
            })
            .collect();
        if !privileges.is_empty() {
            return Verdict::Refused(Refusal::capabilities(&privileges));
        }
        if let Some(f) = missing().find(|f| f.requirement.need == Need::Refuse) {
            let r = f.requirement;
            return Verdict::Refused(Refusal::Kernel {
                release: self.release.clone(),
                feature: r.feature,
                needed_for: r.needed_for,
                since: r.since,
            });
        }
        let degraded: Vec<&'static Requirement> = missing()
            .filter(|f| matches!(f.requirement.need, Need::Degrade { .. }))
            .map(|f| f.requirement)
            .collect();
        if degraded.is_empty() {
            Verdict::Ready
        } else {
            Verdict::Degraded(degraded)
        }
    }

    /// What the loader does differently (whatever the verdict).
    pub fn plan(&self) -> Plan {
        let outcome = |want: fn(&Check) -> bool| {
            self.findings
                .iter()
                .find(|f| want(&f.requirement.check))
                .map(|f| &f.outcome)
        };
        Plan {
            close_tracepoint: outcome(|c| matches!(c, Check::RawTracepoint { .. }))
                != Some(&Outcome::Missing),
            raise_memlock: outcome(|c| matches!(c, Check::MemcgAccounting)) != Some(&Outcome::Ok),
        }
    }

    /// The requirements that could not be probed, and why (when capabilities are missing, all
    /// the kernel's features).
    pub fn unprobed(&self) -> impl Iterator<Item = (&'static Requirement, &str)> {
        self.findings.iter().filter_map(|f| match &f.outcome {
            Outcome::NotProbed(why) => Some((f.requirement, why.as_str())),
            _ => None,
        })
    }
}

/// What an operation needs of the process.
#[derive(Clone, Copy, Debug)]
pub enum Operation<'a> {
    /// Loading and attaching the programs, pinning under `pin_dir`.
    Run { pin_dir: &'a Path },
    /// Detaching the programs and removing the pins.
    Detach,
}

impl Operation<'_> {
    fn needs(self, p: Privilege) -> bool {
        match self {
            Operation::Run { .. } => true,
            Operation::Detach => p == Privilege::Bpf,
        }
    }
}

/// The capabilities `op` needs, without probing the kernel: refused, in one line, when some
/// are missing.
pub fn require_capabilities(op: Operation<'_>) -> Result<(), Refusal> {
    let eff = effective_capabilities();
    let missing: Vec<Privilege> = REQUIREMENTS
        .iter()
        .filter_map(|r| match r.check {
            Check::Capability(p) if op.needs(p) => Some(p),
            _ => None,
        })
        .filter(|p| capability(*p, &eff, op) == Outcome::Missing)
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Refusal::capabilities(&missing))
    }
}

/// Probes everything the agent needs to run with its state pinned under `pin_dir`. The
/// kernel's features are probed only when the process has the capabilities (without them,
/// every `bpf(2)` call fails with EPERM).
pub fn probe(pin_dir: &Path) -> Report {
    let op = Operation::Run { pin_dir };
    let eff = effective_capabilities();
    let mut outcomes: Vec<Option<Outcome>> = REQUIREMENTS
        .iter()
        .map(|r| match r.check {
            Check::Capability(p) => Some(capability(p, &eff, op)),
            _ => None,
        })
        .collect();
    let privileged = !outcomes.contains(&Some(Outcome::Missing));
    let findings = REQUIREMENTS
        .iter()
        .zip(outcomes.iter_mut())
        .map(|(r, outcome)| {
            let outcome = match outcome.take() {
                Some(o) => o,
                None if r.check.uses_bpf() && !privileged => {
                    Outcome::NotProbed("missing capabilities".into())
                }
                None => kernel_feature(r.check),
            };
            Finding {
                requirement: r,
                outcome: match (outcome, r.need) {
                    (Outcome::Missing, Need::Info { .. }) => Outcome::NotNeeded,
                    (o, _) => o,
                },
            }
        })
        .collect();
    Report {
        release: kernel_release(),
        findings,
    }
}

/// The process's effective capabilities (`CapEff` in /proc/self/status), a bit per capability.
fn effective_capabilities() -> io::Result<u64> {
    let status = fs::read_to_string("/proc/self/status")?;
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no CapEff line"))?;
    u64::from_str_radix(hex.trim(), 16).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

fn capability(p: Privilege, eff: &io::Result<u64>, op: Operation<'_>) -> Outcome {
    let eff = match eff {
        Ok(eff) => *eff,
        Err(e) => return Outcome::NotProbed(format!("cannot read /proc/self/status: {e}")),
    };
    if p.held(eff) {
        return Outcome::Ok;
    }
    match (p, op) {
        (Privilege::MountBpffs, Operation::Run { pin_dir }) => match mounts::pin_fs(pin_dir) {
            Ok(PinFs::MountDefault) => Outcome::Missing,
            // Mounted already, or not a place the agent would mount (the loader refuses it).
            _ => Outcome::NotNeeded,
        },
        (Privilege::MountBpffs, Operation::Detach) => Outcome::NotNeeded,
        _ => Outcome::Missing,
    }
}

fn kernel_feature(check: Check) -> Outcome {
    match check {
        // Not a kernel feature: `probe` looks at the process's capabilities itself.
        Check::Capability(_) => Outcome::NotProbed("a capability of the process".into()),
        Check::Cgroup2 => match mounts::cgroup2_mount() {
            Ok(Some(_)) => Outcome::Ok,
            Ok(None) => Outcome::Missing,
            Err(e) => Outcome::NotProbed(format!("cannot read /proc/mounts: {e}")),
        },
        Check::Program(p) => program_outcome(is_program_supported(p)),
        Check::Helper(p, h) => program_outcome(is_helper_supported(p, h)),
        Check::Map(m) => match is_map_supported(m) {
            Ok(true) => Outcome::Ok,
            Ok(false) => Outcome::Missing,
            Err(e) => syscall_failed(&e),
        },
        Check::MmapableArray => mmapable_array(),
        Check::LinkCreate => command_exists(BPF_LINK_CREATE, "BPF_LINK_CREATE"),
        Check::LinkDetach => command_exists(BPF_LINK_DETACH, "BPF_LINK_DETACH"),
        Check::RawTracepoint { system, name } => raw_tracepoint(system, name),
        // Memory cgroup accounting of BPF memory came with Linux 5.11, as did the helper
        // bpf_ktime_get_coarse_ns: there is no direct way to probe the first, so libbpf probes
        // the second, and so does this.
        Check::MemcgAccounting => program_outcome(is_helper_supported(
            ProgramType::SocketFilter,
            BpfHelper::BPF_FUNC_ktime_get_coarse_ns,
        )),
        Check::KernelBtf => {
            if Path::new("/sys/kernel/btf/vmlinux").exists() {
                Outcome::Ok
            } else {
                Outcome::Missing
            }
        }
    }
}

fn program_outcome(r: Result<bool, ProgramError>) -> Outcome {
    match r {
        Ok(true) => Outcome::Ok,
        Ok(false) => Outcome::Missing,
        Err(ProgramError::SyscallError(e)) => syscall_failed(&e),
        Err(e) => Outcome::NotProbed(e.to_string()),
    }
}

fn syscall_failed(e: &SyscallError) -> Outcome {
    Outcome::NotProbed(format!("{}: {}", e.call, e.io_error))
}

// bpf(2) commands and constants (include/uapi/linux/bpf.h).
const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_DETACH: libc::c_long = 34;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_F_MMAPABLE: u32 = 1 << 10;

/// `bpf(2)` with a zeroed 128-byte attribute but for its first `words` (the kernel accepts a
/// longer attribute than it knows when the rest is zero). Returns what the call returns.
fn sys_bpf(cmd: libc::c_long, words: &[u32]) -> io::Result<libc::c_long> {
    let mut attr = [0u8; 128];
    for (chunk, w) in attr.chunks_exact_mut(4).zip(words) {
        chunk.copy_from_slice(&w.to_ne_bytes());
    }
    // SAFETY: bpf(2) with an attribute buffer that outlives the call and holds no pointers.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_ptr(), attr.len()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc)
}

/// Closes a file descriptor a probe's call returned.
fn close(fd: libc::c_long) {
    if let Ok(fd) = i32::try_from(fd) {
        // SAFETY: a new descriptor that this process owns and nothing else holds.
        drop(unsafe { OwnedFd::from_raw_fd(fd) });
    }
}

fn mmapable_array() -> Outcome {
    // union bpf_attr for BPF_MAP_CREATE: map_type, key_size, value_size, max_entries, map_flags.
    match sys_bpf(
        BPF_MAP_CREATE,
        &[BPF_MAP_TYPE_ARRAY, 4, 8, 1, BPF_F_MMAPABLE],
    ) {
        Ok(fd) => {
            close(fd);
            Outcome::Ok
        }
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Outcome::Missing,
        Err(e) => Outcome::NotProbed(format!("BPF_MAP_CREATE: {e}")),
    }
}

/// Whether the kernel knows the command `cmd`, whose attribute starts with a file descriptor:
/// given one that cannot be open, a kernel that knows it answers EBADF, one that does not EINVAL.
fn command_exists(cmd: libc::c_long, name: &str) -> Outcome {
    match sys_bpf(cmd, &[u32::MAX]) {
        Ok(fd) => {
            close(fd);
            Outcome::Ok
        }
        Err(e) if e.raw_os_error() == Some(libc::EBADF) => Outcome::Ok,
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Outcome::Missing,
        Err(e) => Outcome::NotProbed(format!("{name}: {e}")),
    }
}

fn raw_tracepoint(system: &str, name: &str) -> Outcome {
    let symbol = format!("__bpf_trace_{name}");
    let why = match kallsyms_lists(&symbol) {
        Ok(Some(true)) => return Outcome::Ok,
        Ok(Some(false)) => return Outcome::Missing,
        Ok(None) => "/proc/kallsyms lists no symbols".to_string(),
        Err(e) => format!("cannot read /proc/kallsyms: {e}"),
    };
    // Without kallsyms, tracefs shows whether the tracepoint exists (if it is mounted).
    let tracefs = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];
    if tracefs
        .iter()
        .any(|t| Path::new(t).join("events").join(system).join(name).is_dir())
    {
        return Outcome::Ok;
    }
    Outcome::NotProbed(why)
}

/// Whether /proc/kallsyms lists the function `symbol`; `None` when it lists nothing.
fn kallsyms_lists(symbol: &str) -> io::Result<Option<bool>> {
    let listing = fs::read_to_string("/proc/kallsyms")?;
    Ok((!listing.is_empty()).then(|| lists_symbol(&listing, symbol)))
}

/// Whether a kallsyms listing ("<address> <type> <name>[\t[<module>]]" lines) names `symbol`,
/// or a compiler's copy of it such as `symbol.llvm.123`. A substring search (std's, fast even
/// in a debug build: the listing has some hundred thousand lines).
fn lists_symbol(listing: &str, symbol: &str) -> bool {
    listing.match_indices(symbol).any(|(at, _)| {
        let before = listing[..at].chars().next_back();
        let after = listing[at + symbol.len()..].chars().next();
        before == Some(' ') && matches!(after, None | Some('\n' | '\t' | '.'))
    })
}

/// The kernel release, as `uname -r` shows it.
pub fn kernel_release() -> String {
    // SAFETY: `utsname` is plain data, for which all zeroes is a valid value.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: a valid out-pointer.
    if unsafe { libc::uname(&mut u) } != 0 {
        return "unknown release".into();
    }
    // SAFETY: uname(2) NUL-terminates the release within its array.
    unsafe { CStr::from_ptr(u.release.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ProgramType as P;

    fn report(outcome: impl Fn(&Requirement) -> Outcome) -> Report {
        Report {
            release: "5.4.0-150-generic".into(),
            findings: REQUIREMENTS
                .iter()
                .map(|r| Finding {
                    requirement: r,
                    outcome: outcome(r),
                })
                .collect(),
        }
    }

    fn requirement(feature: &str) -> &'static Requirement {
        REQUIREMENTS
            .iter()
            .find(|r| r.feature == feature)
            .unwrap_or_else(|| panic!("no requirement {feature:?}"))
    }

    const TRACEPOINT: &str = "raw tracepoint inet_sock_set_state";

    #[test]
    fn all_present_is_ready() {
        let r = report(|_| Outcome::Ok);
        assert_eq!(r.verdict(), Verdict::Ready);
        assert_eq!(
            r.plan(),
            Plan {
                close_tracepoint: true,
                raise_memlock: false
            }
        );
    }

    #[test]
    fn absent_info_features_change_nothing_but_the_plan() {
        let r = report(|r| match r.need {
            Need::Info { .. } => Outcome::NotNeeded,
            _ => Outcome::Ok,
        });
        assert_eq!(r.verdict(), Verdict::Ready);
        assert!(
            r.plan().raise_memlock,
            "no memcg accounting: raise the limit"
        );
    }

    #[test]
    fn without_the_tracepoint_the_agent_runs_without_sock_close() {
        let r = report(|r| {
            if r.feature == TRACEPOINT {
                Outcome::Missing
            } else {
                Outcome::Ok
            }
        });
        let Verdict::Degraded(what) = r.verdict() else {
            panic!("degraded, not {:?}", r.verdict());
        };
        assert_eq!(what, [requirement(TRACEPOINT)]);
        let Need::Degrade { cost } = what[0].need else {
            panic!("a degrade requirement");
        };
        assert!(cost.contains("predate the agent"), "{cost}");
        assert!(cost.contains("outflow-agent detach"), "{cost}");
        assert!(!r.plan().close_tracepoint);
    }

    #[test]
    fn a_missing_required_feature_refuses_in_one_line_naming_it_and_its_version() {
        let links = "BPF links for cgroups (BPF_LINK_CREATE)";
        let r = report(|r| {
            // The first missing one is named (a 5.4 kernel also lacks the ring buffer).
            if r.feature == links || r.feature == "map type ringbuf" || r.feature == TRACEPOINT {
                Outcome::Missing
            } else {
                Outcome::Ok
            }
        });
        let Verdict::Refused(refusal) = r.verdict() else {
            panic!("refused, not {:?}", r.verdict());
        };
        let line = refusal.to_string();
        assert_eq!(
            line,
            "this kernel (5.4.0-150-generic) lacks BPF links for cgroups (BPF_LINK_CREATE) (needed for keeping counting across agent restarts; Linux 5.7 or later); outflow-agent needs Linux 5.10 or later"
        );
        assert!(!line.contains('\n'));
    }

    #[test]
    fn missing_capabilities_refuse_first_naming_them() {
        let r = report(|r| match r.check {
            Check::Capability(Privilege::Perfmon) => Outcome::Missing,
            Check::Capability(Privilege::MountBpffs) => Outcome::NotNeeded,
            Check::Capability(_) => Outcome::Ok,
            _ => Outcome::NotProbed("missing capabilities".into()),
        });
        let Verdict::Refused(refusal) = r.verdict() else {
            panic!("refused, not {:?}", r.verdict());
        };
        let line = refusal.to_string();
        assert!(
            line.starts_with("missing capability CAP_PERFMON (or CAP_SYS_ADMIN): needed for storing socket addresses in maps"),
            "{line}"
        );
        assert!(line.contains("run as root or grant them"), "{line}");
        assert!(!line.contains('\n'));

        let r = report(|r| match r.check {
            Check::Capability(Privilege::Bpf | Privilege::NetAdmin) => Outcome::Missing,
            _ => Outcome::Ok,
        });
        let Verdict::Refused(refusal) = r.verdict() else {
            panic!("refused");
        };
        assert!(
            refusal.to_string().starts_with(
                "missing capabilities CAP_BPF (or CAP_SYS_ADMIN), CAP_NET_ADMIN (or CAP_SYS_ADMIN): needed for loading the programs"
            ),
            "{refusal}"
        );
    }

    #[test]
    fn sys_admin_stands_in_for_the_newer_capabilities() {
        let sys_admin = 1 << CAP_SYS_ADMIN;
        for p in [
            Privilege::Bpf,
            Privilege::NetAdmin,
            Privilege::Perfmon,
            Privilege::MountBpffs,
        ] {
            assert!(p.held(sys_admin), "{p:?}");
        }
        let split = (1 << CAP_BPF) | (1 << CAP_NET_ADMIN) | (1 << CAP_PERFMON);
        assert!(Privilege::Bpf.held(split));
        assert!(Privilege::NetAdmin.held(split));
        assert!(Privilege::Perfmon.held(split));
        assert!(!Privilege::MountBpffs.held(split));
        assert!(!Privilege::Perfmon.held((1 << CAP_BPF) | (1 << CAP_NET_ADMIN)));
    }

    #[test]
    fn capability_rows_name_their_capability() {
        for r in REQUIREMENTS {
            if let Check::Capability(p) = r.check {
                assert_eq!(r.feature, format!("capability {}", p.name()));
                assert_eq!(r.need, Need::Refuse);
            }
        }
    }

    #[test]
    fn the_features_are_named_once_and_dated() {
        for (i, r) in REQUIREMENTS.iter().enumerate() {
            assert!(
                REQUIREMENTS[..i].iter().all(|o| o.feature != r.feature),
                "{} listed twice",
                r.feature
            );
            let dated = r.since == "-" || r.since.split('.').all(|n| n.parse::<u32>().is_ok());
            assert!(dated, "{}: since {:?}", r.feature, r.since);
        }
    }

    /// The helpers each program of the embedded object calls (after linking its functions, as
    /// the loader does) are those probed for its program type: no more, no fewer.
    #[test]
    fn the_helpers_probed_are_those_the_programs_call() {
        use std::collections::BTreeSet;

        use aya_obj::{Object, ProgramSection};
        // BPF_JMP | BPF_CALL; a source register of 0 calls a helper (1, a function).
        const CALL: u8 = 0x85;
        // Map lookups, updates and deletes: every program type has them.
        const BASE: [i32; 3] = [1, 2, 3];
        let mut obj = Object::parse(crate::kernel::PROGRAMS).expect("the embedded object parses");
        let text = obj.functions.keys().map(|(section, _)| *section).collect();
        obj.relocate_calls(&text).expect("its calls link");
        let mut called = BTreeSet::new();
        for (name, program) in &obj.programs {
            let ty = match program.section {
                ProgramSection::CgroupSkb { .. } => P::CgroupSkb,
                ProgramSection::SockOps => P::SockOps,
                ProgramSection::CgroupSockopt { .. } => P::CgroupSockopt,
                ProgramSection::RawTracePoint => P::RawTracePoint,
                ref other => panic!("{name} is a {other:?} program: add probes for it"),
            };
            assert!(
                REQUIREMENTS
                    .iter()
                    .any(|r| matches!(r.check, Check::Program(t) if t == ty)),
                "program type {ty:?} of {name} is not probed"
            );
            let function = &obj.functions[&program.function_key()];
            called.extend(
                function
                    .instructions
                    .iter()
                    .filter(|i| i.code == CALL && i.src_reg() == 0 && !BASE.contains(&i.imm))
                    .map(|i| (format!("{ty:?}"), i.imm)),
            );
        }
        let probed: BTreeSet<(String, i32)> = REQUIREMENTS
            .iter()
            .filter_map(|r| match r.check {
                Check::Helper(t, h) => Some((format!("{t:?}"), h as i32)),
                _ => None,
            })
            .collect();
        assert!(!called.is_empty(), "helper calls found");
        let unprobed: Vec<_> = called.difference(&probed).collect();
        let uncalled: Vec<_> = probed.difference(&called).collect();
        assert!(
            unprobed.is_empty() && uncalled.is_empty(),
            "(program type, helper number) called but not probed: {unprobed:?}; probed but not called: {uncalled:?}"
        );
    }

    #[test]
    fn kallsyms_names_are_matched_whole_or_with_a_compiler_suffix() {
        let listing = "0000000000000000 T __traceiter_inet_sock_set_state\n\
                       0000000000000000 t __bpf_trace_inet_sock_set_state_x\n\
                       0000000000000000 t __bpf_trace_tcp_probe.llvm.42\t[tcp_probe]\n";
        assert!(!lists_symbol(listing, "__bpf_trace_inet_sock_set_state"));
        assert!(lists_symbol(listing, "__bpf_trace_tcp_probe"));
        assert!(lists_symbol(listing, "__traceiter_inet_sock_set_state"));
        assert!(!lists_symbol(listing, "inet_sock_set_state"));
    }
}
