//! The connection table, memory-mapped: reading deltas, and giving closed slots back.
//!
//! The kernel writes a slot's counters while the agent reads them, so the mapping is only ever
//! accessed through raw pointers with volatile reads and writes, one aligned field at a time.
//! Each counter is monotonic, so any snapshot is a valid cumulative value: the delta reported is
//! `snapshot - reported`, and `reported` (in the slot itself) becomes the snapshot once the
//! delta is out. A restarted agent therefore continues exactly where the last one stopped.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsFd, AsRawFd},
    ptr::{self, NonNull},
};

use agent_common::{AF_INET6, ConnHot, ConnSlot, Counters, SLOT_CLOSED, SLOT_FREE, SLOT_LIVE};
use aya::maps::{HashMap, Map, MapData, MapError};

#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("the connection table is not an array map")]
    NotArray,
    #[error("cannot map the connection table into memory: {0}")]
    Mmap(std::io::Error),
    #[error("cannot give slot {slot} back to the kernel: {reason}")]
    Free { slot: u32, reason: String },
}

/// Who a connection is: written once by the kernel when it took the slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub cookie: u64,
    pub first_seen_ns: u64,
    pub cgroup_id: u64,
    pub local_addr: IpAddr,
    pub remote_addr: IpAddr,
    pub local_port: u16,
    pub remote_port: u16,
    pub role: u8,
}

/// A slot whose counters moved since the last report, or that closed.
#[derive(Clone, Debug)]
pub struct SlotDelta {
    pub index: u32,
    pub generation: u32,
    /// Cumulative counters read now; becomes the slot's `reported` on commit.
    pub snapshot: Counters,
    /// `snapshot - reported`.
    pub delta: Counters,
    /// The connection is gone: this is its last record, and the slot is freed on commit.
    pub closed: bool,
    pub identity: Identity,
    /// The slot's latest turn and latest lost turn (`ConnSlot::turn`, `lost_turn`), read after
    /// the counters: every byte in `snapshot` belongs to a turn up to `turn`.
    pub turn: u32,
    pub lost_turn: u32,
}

impl SlotDelta {
    /// The watermark before this delta (what was reported so far).
    pub fn reported(&self) -> Counters {
        self.snapshot.delta_since(&self.delta)
    }
}

/// What committing one reported slot writes: enough to redo the commit after a crash, and to
/// tell whether it was done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotCommit {
    pub index: u32,
    pub generation: u32,
    /// The slot's watermark when it was read (what it is if the commit was not done).
    pub before: Counters,
    /// The watermark the commit writes.
    pub snapshot: Counters,
    pub closed: bool,
}

impl From<&SlotDelta> for SlotCommit {
    fn from(d: &SlotDelta) -> Self {
        Self {
            index: d.index,
            generation: d.generation,
            before: d.reported(),
            snapshot: d.snapshot,
            closed: d.closed,
        }
    }
}

/// The overflow watermark before and after an interval's commit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OverflowCommit {
    pub before: Counters,
    pub after: Counters,
}

/// Everything an interval's commit writes for the records it reported. A sink that makes the
/// records durable keeps it beside them, so that a commit cut short by a crash is redone by the
/// next agent instead of the records being read, and counted, a second time.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CommitPlan {
    pub slots: Vec<SlotCommit>,
    pub overflow: Option<OverflowCommit>,
}

/// An array map created with `BPF_F_MMAPABLE`, mapped into memory.
struct Mapping<T> {
    base: NonNull<T>,
    len_bytes: usize,
    /// Keeps the map's fd open for as long as the mapping lives.
    _map: Map,
}

impl<T> Mapping<T> {
    fn new(map: Map, capacity: u32) -> Result<Self, TableError> {
        let Map::Array(data) = &map else {
            return Err(TableError::NotArray);
        };
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let len_bytes = (size_of::<T>() * capacity as usize).div_ceil(page) * page;
        let fd = data.fd().as_fd().as_raw_fd();
        // SAFETY: a shared read-write mapping of a BPF array map of `capacity` values.
        let p = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len_bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(TableError::Mmap(std::io::Error::last_os_error()));
        }
        let base = NonNull::new(p.cast::<T>()).ok_or(TableError::NotArray)?;
        Ok(Self {
            base,
            len_bytes,
            _map: map,
        })
    }
}

impl<T> Drop for Mapping<T> {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len_bytes) };
    }
}

pub struct ConnTable {
    slots: Mapping<ConnSlot>,
    /// The hot lines (counters, watermarks, owner), indexed like the slots.
    hot: Mapping<ConnHot>,
    capacity: u32,
    /// The kernel's claims on slots ([`agent_common::names::SLOT_CLAIMS`]); a freed slot's claim
    /// is removed, which hands it back.
    claims: HashMap<MapData, u32, u32>,
}

// SAFETY: the mappings are owned by this value and only accessed through &self/&mut self.
unsafe impl Send for ConnTable {}

macro_rules! field {
    ($base:expr, $field:ident) => {
        ptr::addr_of_mut!((*$base).$field)
    };
}

impl ConnTable {
    /// Maps the table and its hot lines (array maps created with `BPF_F_MMAPABLE`) into memory.
    pub fn map(
        slots: Map,
        hot: Map,
        claims: HashMap<MapData, u32, u32>,
        capacity: u32,
    ) -> Result<Self, TableError> {
        Ok(Self {
            slots: Mapping::new(slots, capacity)?,
            hot: Mapping::new(hot, capacity)?,
            capacity,
            claims,
        })
    }

    pub const fn capacity(&self) -> u32 {
        self.capacity
    }

    fn slot(&self, index: u32) -> *mut ConnSlot {
        debug_assert!(index < self.capacity);
        // SAFETY: index < capacity, within the mapping.
        unsafe { self.slots.base.as_ptr().add(index as usize) }
    }

    fn hot(&self, index: u32) -> *mut ConnHot {
        debug_assert!(index < self.capacity);
        // SAFETY: index < capacity, within the mapping.
        unsafe { self.hot.base.as_ptr().add(index as usize) }
    }

    /// Number of slots currently held by connections (live or closed but not yet reported).
    pub fn in_use(&self) -> u32 {
        (0..self.capacity)
            .filter(|&i| {
                // SAFETY: in-bounds slot pointer; volatile read of an aligned u32.
                unsafe { ptr::read_volatile(field!(self.slot(i), state)) != SLOT_FREE }
            })
            .count() as u32
    }

    /// Free slots that are still claimed, with their generation. A previous agent killed
    /// between freeing a slot and removing its claim leaves such a slot, which no connection
    /// can take again; a connection taking a free slot is in this state too, for an instant.
    /// [`ConnTable::release_stale_claims`] tells the two apart by waiting.
    pub fn claimed_free_slots(&self) -> Vec<(u32, u32)> {
        // The claims, not the whole table: as many lookups as slots in use.
        self.claims
            .keys()
            .filter_map(Result::ok)
            .filter(|&i| i < self.capacity)
            .filter_map(|i| {
                let s = self.slot(i);
                // SAFETY: in-bounds slot pointer; volatile reads of aligned fields.
                let (state, generation) = unsafe {
                    (
                        ptr::read_volatile(field!(s, state)),
                        ptr::read_volatile(field!(s, generation)),
                    )
                };
                (state == SLOT_FREE).then_some((i, generation))
            })
            .collect()
    }

    /// Removes the claims of `slots` (from [`ConnTable::claimed_free_slots`], a while ago)
    /// that are still free in the same generation and still claimed: no connection is taking
    /// them, they were left behind. Returns how many were handed back.
    pub fn release_stale_claims(&mut self, slots: &[(u32, u32)]) -> Result<usize, TableError> {
        let mut n = 0;
        for &(index, generation) in slots {
            if index >= self.capacity {
                continue;
            }
            let s = self.slot(index);
            // SAFETY: in-bounds slot pointer; volatile reads of aligned fields.
            let unchanged = unsafe {
                ptr::read_volatile(field!(s, state)) == SLOT_FREE
                    && ptr::read_volatile(field!(s, generation)) == generation
            };
            if !unchanged || self.claims.get(&index, 0).is_err() {
                continue;
            }
            match self.claims.remove(&index) {
                Ok(()) => n += 1,
                Err(MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => {
                    return Err(TableError::Free {
                        slot: index,
                        reason: e.to_string(),
                    });
                }
            }
        }
        Ok(n)
    }

    /// Every slot whose counters moved since its last report, and every closed slot.
    pub fn collect(&self) -> Vec<SlotDelta> {
        let mut out = Vec::new();
        for index in 0..self.capacity {
            let s = self.slot(index);
            // SAFETY: in-bounds slot pointer; all reads are volatile reads of aligned fields.
            unsafe {
                let state = ptr::read_volatile(field!(s, state));
                if state != SLOT_LIVE && state != SLOT_CLOSED {
                    continue;
                }
                // Read the state before the counters: once CLOSED is seen they are final.
                std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
                let snapshot = ptr::read_volatile(field!(self.hot(index), counters));
                let reported = ptr::read_volatile(field!(s, reported));
                let delta = snapshot.delta_since(&reported);
                let closed = state == SLOT_CLOSED;
                if delta.is_zero() && !closed {
                    continue;
                }
                // After the counters: a turn that started before a counted byte is seen.
                std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
                out.push(SlotDelta {
                    index,
                    generation: ptr::read_volatile(field!(s, generation)),
                    snapshot,
                    delta,
                    closed,
                    identity: read_identity(s),
                    turn: ptr::read_volatile(field!(s, turn)),
                    lost_turn: ptr::read_volatile(field!(s, lost_turn)),
                });
            }
        }
        out
    }

    /// Who holds slot `index` in generation `generation`, if a connection does.
    pub fn identity(&self, index: u32, generation: u32) -> Option<Identity> {
        if index >= self.capacity {
            return None;
        }
        let s = self.slot(index);
        // SAFETY: in-bounds slot pointer; volatile reads of aligned fields.
        unsafe {
            let state = ptr::read_volatile(field!(s, state));
            if state != SLOT_LIVE && state != SLOT_CLOSED {
                return None;
            }
            std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
            if ptr::read_volatile(field!(s, generation)) != generation {
                return None;
            }
            Some(read_identity(s))
        }
    }

    /// Records that `deltas` were reported: their snapshots become the watermarks, and closed
    /// slots go back to the kernel. Call only after the records are out.
    pub fn commit(&mut self, deltas: &[SlotDelta], now_boot_ns: u64) -> Result<(), TableError> {
        for d in deltas {
            self.commit_slot(&SlotCommit::from(d), now_boot_ns, false)?;
        }
        Ok(())
    }

    /// Redoes a commit that may have been cut short: only the slots still exactly as they were
    /// read (same generation, not freed, watermark `before`) are written, so a commit that was
    /// done, or overtaken, is left alone. Returns how many slots were written.
    pub fn redo(&mut self, slots: &[SlotCommit], now_boot_ns: u64) -> Result<usize, TableError> {
        let mut n = 0;
        for c in slots {
            if c.index < self.capacity && self.commit_slot(c, now_boot_ns, true)? {
                n += 1;
            }
        }
        Ok(n)
    }

    fn commit_slot(
        &mut self,
        c: &SlotCommit,
        now_boot_ns: u64,
        only_if_undone: bool,
    ) -> Result<bool, TableError> {
        let s = self.slot(c.index);
        // SAFETY: in-bounds slot pointer; volatile writes of aligned fields the kernel does
        // not write while the slot is live (reported, last_seen) or that it only writes
        // when taking a free slot (generation, state).
        unsafe {
            if ptr::read_volatile(field!(s, generation)) != c.generation {
                return Ok(false);
            }
            if only_if_undone {
                let state = ptr::read_volatile(field!(s, state));
                if (state != SLOT_LIVE && state != SLOT_CLOSED)
                    || ptr::read_volatile(field!(s, reported)) != c.before
                {
                    return Ok(false);
                }
            }
            ptr::write_volatile(field!(s, reported), c.snapshot);
            ptr::write_volatile(field!(s, last_seen_ns), now_boot_ns);
            if c.closed {
                // No owner (the kernel cleared it at the close; again, in case a packet of the
                // closing socket raced it) and a new generation first, so a late packet of the
                // old socket cannot count into the next connection; then free, then remove the
                // claim, which hands the slot back.
                ptr::write_volatile(field!(self.hot(c.index), owner), 0);
                ptr::write_volatile(field!(s, generation), c.generation.wrapping_add(1));
                ptr::write_volatile(field!(s, state), SLOT_FREE);
                std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
                match self.claims.remove(&c.index) {
                    Ok(()) => {}
                    // Not there: a redone commit whose removal was done.
                    Err(MapError::SyscallError(e))
                        if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                    Err(e) => {
                        return Err(TableError::Free {
                            slot: c.index,
                            reason: e.to_string(),
                        });
                    }
                }
            }
        }
        Ok(true)
    }
}

/// # Safety
/// `s` points to a slot in the mapping.
unsafe fn read_identity(s: *mut ConnSlot) -> Identity {
    // SAFETY: per the function's contract; the identity line is written before the slot goes live.
    unsafe {
        let family = ptr::read_volatile(field!(s, family));
        let local = ptr::read_volatile(field!(s, local_addr));
        let remote = ptr::read_volatile(field!(s, remote_addr));
        Identity {
            cookie: ptr::read_volatile(field!(s, cookie)),
            first_seen_ns: ptr::read_volatile(field!(s, first_seen_ns)),
            cgroup_id: ptr::read_volatile(field!(s, cgroup_id)),
            local_addr: addr(family, local),
            remote_addr: addr(family, remote),
            local_port: ptr::read_volatile(field!(s, local_port)),
            remote_port: ptr::read_volatile(field!(s, remote_port)),
            role: ptr::read_volatile(field!(s, role)),
        }
    }
}

/// An address as the kernel stored it; v4-mapped IPv6 becomes IPv4.
fn addr(family: u16, b: [u8; 16]) -> IpAddr {
    if family == AF_INET6 {
        let v6 = Ipv6Addr::from(b);
        v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
    } else {
        IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_mapped_addresses_show_as_ipv4() {
        let mut b = [0u8; 16];
        b[10] = 0xff;
        b[11] = 0xff;
        b[12..].copy_from_slice(&[198, 18, 0, 2]);
        assert_eq!(
            addr(AF_INET6, b),
            "198.18.0.2".parse::<IpAddr>().expect("ip")
        );
        let v6: Ipv6Addr = "2001:db8::2".parse().expect("ip");
        assert_eq!(addr(AF_INET6, v6.octets()), IpAddr::V6(v6));
        assert_eq!(
            addr(
                agent_common::AF_INET,
                [10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
            ),
            "10.0.0.1".parse::<IpAddr>().expect("ip")
        );
    }
}
