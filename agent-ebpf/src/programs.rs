//! The programs of the outflow object (see the crate root). `count` is shared with the
//! benchmark object (`bench.rs`), so that what is measured is what runs.

use agent_common::{
    AF_INET, AF_INET6, ANNOTATION_MAX, CAPTURE_MAX, ConnHot, ConnSlot, Counters, EVENT_ANNOTATION,
    EVENT_MORE, EVENT_TURN, OUTFLOW_CLIENT_ID, OWNER_AWAIT_TURN, OWNER_CAPTURE, OWNER_CAPTURING,
    OWNER_FLAGS, ROLE_CLIENT, ROLE_SERVER, ROLE_UNKNOWN, SK_NEED_CGROUP, SK_RCV_INIT, SK_SND_INIT,
    SLOT_CLOSED, SLOT_FREE, SLOT_GROUP, SLOT_LIVE, SLOT_PLACE_GROUPS, SOL_OUTFLOW, SkState,
    SlotRef, TupleKey, TurnEvent, home_group, slot, stat,
};
use aya_ebpf::{
    bindings::{__sk_buff, BPF_NOEXIST, bpf_sock},
    helpers::{
        bpf_get_socket_cookie, bpf_ktime_get_boot_ns, bpf_ringbuf_output, bpf_ringbuf_query,
        bpf_sk_fullsock, bpf_skb_cgroup_id, bpf_skb_load_bytes, bpf_sock_ops_cb_flags_set,
        bpf_tcp_sock,
    },
    macros::{cgroup_skb, cgroup_sockopt, raw_tracepoint, sock_ops},
    programs::{RawTracePointContext, SkBuffContext, SockOpsContext, SockoptContext},
};

use crate::maps::{
    CONFIG, CONN_HOT, CONNS, EVENT_SCRATCH, LEGACY, OVERFLOW, SLOT_CLAIMS, SOCK_KEY, STATS,
    events_ptr, sk_state, sk_state_delete,
};
use crate::packet;

const ALLOW: i32 = 1;
const IPPROTO_TCP: u32 = 6;

// TCP states (include/net/tcp_states.h).
const TCP_SYN_SENT: u32 = 2;
const TCP_SYN_RECV: u32 = 3;
const TCP_CLOSE: u32 = 7;
const TCP_LISTEN: u32 = 10;
const TCP_NEW_SYN_RECV: u32 = 12;

// sock_ops operations (include/uapi/linux/bpf.h).
const BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB: u32 = 4;
const BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB: u32 = 5;
const BPF_SOCK_OPS_STATE_CB: u32 = 10;
const BPF_SOCK_OPS_STATE_CB_FLAG: u32 = 1 << 2;

#[cgroup_skb]
pub fn count_egress(ctx: SkBuffContext) -> i32 {
    count::<true>(ctx.skb.skb, socket_of(&ctx));
    ALLOW
}

#[cgroup_skb]
pub fn count_ingress(ctx: SkBuffContext) -> i32 {
    count::<false>(ctx.skb.skb, socket_of(&ctx));
    ALLOW
}

/// The packet's socket, or null.
#[inline(always)]
fn socket_of(ctx: &SkBuffContext) -> *mut bpf_sock {
    // SAFETY: `skb` is the program's context; `sk` may be null.
    unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk }
}

/// The per-packet path, for the packet `skb` of socket `sk` (the benchmark programs pass a
/// socket they looked up). Never drops a packet: the callers return ALLOW whatever happens.
#[inline(always)]
pub(crate) fn count<const EGRESS: bool>(skb: *mut __sk_buff, sk: *mut bpf_sock) {
    if sk.is_null() {
        return;
    }
    let Some(cfg) = CONFIG.get(0) else {
        return;
    };
    if cfg.exclude_loopback != 0 && sock_is_loopback(sk) {
        return;
    }
    // The fast path: the slot whose owner is this socket, among the few of its home group. No
    // lookup is keyed by the connection, and nothing but the slot's first line is touched.
    let key = sock_key(sk);
    let ports = sock_ports(sk);
    let s = match find_slot(key, ports, cfg.slot_groups) {
        Some(s) => s,
        None => match slow_path::<EGRESS>(skb, sk, key, ports) {
            Some(s) => s,
            None => return,
        },
    };
    // SAFETY: a pointer into the hot lines' table, checked by the lookup.
    count_in_slot::<EGRESS>(skb, sk, unsafe { &mut *s });
}

/// The socket's address as a number, the key its slot is placed by (0 if it cannot be had).
/// The pointer goes through this CPU's scratch value: a privileged program may store a
/// pointer into a map value, and what it reads back is a plain number.
#[inline(always)]
pub(crate) fn sock_key<S>(sk: *mut S) -> u64 {
    let Some(p) = SOCK_KEY.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: this CPU's scratch value, written and read back at once.
    unsafe {
        core::ptr::write_volatile(p.cast::<*mut S>(), sk);
        core::ptr::read_volatile(p)
    }
}

/// A socket key that can own a slot: a socket address (not 0, its flag bits clear).
#[inline(always)]
fn placeable(key: u64) -> bool {
    key != 0 && key & OWNER_FLAGS == 0
}

/// Both ports of the socket, for its placement (from the socket's common part, which the stack
/// has just used).
#[inline(always)]
pub(crate) fn sock_ports(sk: *mut bpf_sock) -> u32 {
    // SAFETY: fields of the socket's common part, readable from every program type here.
    unsafe { ((*sk).src_port << 16) ^ u32::from((*sk).dst_port) }
}

/// The hot line of the live slot whose owner is the socket `key` (with `ports`), if it is in
/// its home group.
#[inline(always)]
pub(crate) fn find_slot(key: u64, ports: u32, groups: u32) -> Option<*mut ConnHot> {
    if !placeable(key) || groups == 0 {
        return None;
    }
    let base = home_group(key, ports, groups) * SLOT_GROUP;
    let mut i = 0;
    while i < SLOT_GROUP {
        let s = CONN_HOT.get_ptr_mut(base + i)?;
        // SAFETY: pointer into the array map, checked by the lookup.
        if unsafe { core::ptr::read_volatile(&raw const (*s).owner) } & !OWNER_FLAGS == key {
            return Some(s);
        }
        i += 1;
    }
    None
}

/// The way through the socket's storage: a connection's first packets (adopting it, taking
/// or publishing its slot), slots placed away from their home group, and sockets without a
/// slot (counted here, in overflow). Returns the slot to count in, if there is one.
#[inline(never)]
fn slow_path<const EGRESS: bool>(
    skb: *mut __sk_buff,
    sk: *mut bpf_sock,
    key: u64,
    ports: u32,
) -> Option<*mut ConnHot> {
    // The helper itself refuses request and time-wait sockets, and only TCP sockets ever get a
    // state, so there is nothing to check first.
    let mut st = sk_state(sk, None);
    if st.is_null() {
        st = adopt(sk);
        if st.is_null() {
            return None;
        }
    }
    // SAFETY: non-null socket storage pointer returned by the helper.
    let st = unsafe { &mut *st };
    if st.slot == slot::UNALLOCATED {
        if st.role != u32::from(ROLE_UNKNOWN) {
            // sock_ops made this state and is taking the connection's slot on another CPU right
            // now: a second slot here would split the connection in two. This packet's payload
            // is counted by the next one (counting follows sequence numbers); only its segment
            // and wire bytes are not, as for a packet of a handshake state.
            return None;
        }
        take_slot_from_skb(skb, sk, key, ports, st);
    }
    if st.slot == slot::IGNORED {
        return None;
    }
    if st.flags & SK_NEED_CGROUP != 0 {
        set_cgroup(skb, st);
    }
    if let Some(s) = slot_of(st) {
        // SAFETY: pointer into the array map, checked by the lookup.
        let owner = unsafe { &raw mut (*s).owner };
        // SAFETY: as above.
        unsafe {
            let o = core::ptr::read_volatile(owner);
            if o & !OWNER_FLAGS == 0 && placeable(key) {
                // Published: from now on the fast path finds it (if it is in its home group).
                core::ptr::write_volatile(owner, key | (o & OWNER_FLAGS));
            }
        }
        return Some(s);
    }
    count_unslotted::<EGRESS>(skb, st);
    None
}

/// A socket without a slot (the table was full, or its slot was given back): its bytes go to
/// the overflow counters, against the watermarks of its own storage.
#[inline(always)]
fn count_unslotted<const EGRESS: bool>(skb: *mut __sk_buff, st: &mut SkState) {
    let pkt = parse_counted(skb);
    let (max, init) = if EGRESS {
        (&mut st.snd_max, SK_SND_INIT)
    } else {
        (&mut st.rcv_max, SK_RCV_INIT)
    };
    if pkt.payload > 0 && st.flags & init == 0 {
        *max = pkt.seq;
        st.flags |= init;
    }
    let advance = advance(&pkt, max);
    let Some(c) = OVERFLOW.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's overflow value.
    add(unsafe { &mut *c }, EGRESS, advance, &pkt);
}

/// The packet's headers; a packet whose headers cannot be read is counted.
#[inline(always)]
fn parse_counted(skb: *mut __sk_buff) -> packet::Packet {
    let pkt = packet::parse(skb);
    if !pkt.parsed {
        bump(stat::UNPARSED_PACKETS);
    }
    pkt
}

/// The new sequence space the packet's payload covers beyond the highest seen, `max` (which it
/// moves to the payload's end): a retransmission is not counted twice.
#[inline(always)]
fn advance(pkt: &packet::Packet, max: &mut u32) -> u64 {
    if pkt.payload == 0 {
        return 0;
    }
    let end = pkt.seq.wrapping_add(pkt.payload);
    let adv = end.wrapping_sub(*max) as i32;
    if adv > 0 {
        *max = end;
        adv as u64
    } else {
        0
    }
}

/// Counts the packet in the connection's slot: the payload's advance beyond the highest
/// sequence number seen (so a retransmission is not counted twice), its wire bytes and
/// segments, and, for a captured connection, the turns.
#[inline(always)]
fn count_in_slot<const EGRESS: bool>(skb: *mut __sk_buff, sk: *mut bpf_sock, s: &mut ConnHot) {
    let pkt = parse_counted(skb);
    let advance = advance(
        &pkt,
        if EGRESS {
            &mut s.snd_max
        } else {
            &mut s.rcv_max
        },
    );
    // Turns of an accepted connection, for client attribution: any new outgoing payload ends
    // the client's turn; the next new incoming payload starts one and is captured (a cold path,
    // once per request, not per packet).
    if advance > 0 && s.owner & OWNER_CAPTURE != 0 {
        if EGRESS {
            if s.owner & OWNER_AWAIT_TURN == 0 {
                s.owner |= OWNER_AWAIT_TURN;
            }
        } else if s.owner & (OWNER_AWAIT_TURN | OWNER_CAPTURING) != 0 {
            // The new bytes are the last `advance` of the payload (the rest was retransmitted).
            let off = pkt.payload_offset + (pkt.payload - advance as u32);
            capture(skb, sk, s, off, advance as u32);
        }
    }
    add(&mut s.counters, EGRESS, advance, &pkt);
}

#[inline(always)]
fn add(c: &mut Counters, egress: bool, advance: u64, pkt: &packet::Packet) {
    if egress {
        c.bytes_out += advance;
        c.wire_bytes_out += pkt.wire_bytes;
        c.segments_out += pkt.segments;
    } else {
        c.bytes_in += advance;
        c.wire_bytes_in += pkt.wire_bytes;
        c.segments_in += pkt.segments;
    }
}

/// Captures the start of a turn (or more of its first bytes), for the agent to read the client
/// from: `len` new payload bytes at `off` in the packet, before the hot line `h` counts them.
/// The turn's number and the bytes left to capture are in the socket's storage (this runs once
/// or twice per request, not per packet).
#[inline(never)]
fn capture(skb: *mut __sk_buff, sk: *mut bpf_sock, h: &mut ConnHot, off: u32, len: u32) {
    let owner = h.owner;
    let st = sk_state(sk, None);
    let slot = if st.is_null() {
        None
    } else {
        // SAFETY: non-null socket storage pointer returned by the helper.
        CONNS.get_ptr_mut(unsafe { (*st).slot })
    };
    let Some(s) = slot else {
        h.owner = owner & !(OWNER_AWAIT_TURN | OWNER_CAPTURING);
        return;
    };
    // SAFETY: non-null socket storage pointer, and a pointer into the connection table.
    let (st, s) = unsafe { (&mut *st, &mut *s) };
    let start = owner & OWNER_AWAIT_TURN != 0;
    if start {
        st.turn += 1;
        let budget = CONFIG.get(0).map_or(0, |c| c.capture_bytes);
        st.capture_left = if budget > CAPTURE_MAX as u32 {
            CAPTURE_MAX as u32
        } else {
            budget
        };
    }
    let n = if len < st.capture_left {
        len
    } else {
        st.capture_left
    };
    let sent = n > 0 && n <= CAPTURE_MAX as u32 && emit(skb, st, off, n, start, &h.counters);
    if sent {
        st.capture_left -= n;
    } else {
        st.capture_left = 0;
        bump(stat::TURN_EVENTS_LOST);
        // SAFETY: a field of the slot.
        unsafe { core::ptr::write_volatile(&raw mut s.lost_turn, st.turn) };
    }
    let flags = if st.capture_left != 0 {
        OWNER_CAPTURING
    } else {
        0
    };
    h.owner = (owner & !(OWNER_AWAIT_TURN | OWNER_CAPTURING)) | flags;
    if start {
        // After the event, before any byte of the turn is counted: the agent reads the
        // counters, then this, then the ring buffer.
        // SAFETY: a field of the slot.
        unsafe { core::ptr::write_volatile(&raw mut s.turn, st.turn) };
    }
}

/// Header bytes of a [`TurnEvent`] (before `data`).
const EVENT_HEADER: u32 = (size_of::<TurnEvent>() - CAPTURE_MAX) as u32;
const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;
const BPF_RB_AVAIL_DATA: u64 = 0;
const BPF_RB_RING_SIZE: u64 = 1;

/// Writes one turn event of `n` (1..=CAPTURE_MAX) bytes; false if the ring buffer is full.
#[inline(always)]
fn emit(skb: *mut __sk_buff, st: &SkState, off: u32, n: u32, start: bool, at: &Counters) -> bool {
    let Some(e) = EVENT_SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    let len = bounded_len(n);
    // SAFETY: `e` points to this CPU's scratch event; `len` is bounded by its data array.
    unsafe {
        (*e).slot = st.slot;
        (*e).generation = st.generation;
        (*e).turn = st.turn;
        (*e).kind = if start { EVENT_TURN } else { EVENT_MORE };
        (*e).len = len as u16;
        (*e).at = *at;
        if bpf_skb_load_bytes(skb.cast(), off, (&raw mut (*e).data).cast(), len) != 0 {
            return false;
        }
    }
    output(e, len)
}

/// Copies the first `len` data bytes of the scratch event `e` into the ring buffer. The agent
/// is woken only once an eighth of the ring is waiting (it also reads at every interval): a
/// wake-up per request would cost several times the capture itself.
#[inline(always)]
fn output(e: *mut TurnEvent, len: u32) -> bool {
    // SAFETY: helpers on the ring buffer map; `e` is a map value of EVENT_HEADER + CAPTURE_MAX
    // bytes and the size is at most that.
    unsafe {
        let ring = events_ptr();
        let waiting = bpf_ringbuf_query(ring, BPF_RB_AVAIL_DATA);
        let size = bpf_ringbuf_query(ring, BPF_RB_RING_SIZE);
        let flags = if waiting >= size / 8 {
            BPF_RB_FORCE_WAKEUP
        } else {
            BPF_RB_NO_WAKEUP
        };
        bpf_ringbuf_output(ring, e.cast(), u64::from(EVENT_HEADER + len), flags) == 0
    }
}

/// `n` (1..=CAPTURE_MAX) in a form the verifier can bound: the compiler knows the range and
/// would drop a plain mask, so the mask is done in assembly on `n - 1`.
#[inline(always)]
fn bounded_len(n: u32) -> u32 {
    let mut m = u64::from(n.wrapping_sub(1));
    // SAFETY: one ALU instruction on a register.
    unsafe {
        core::arch::asm!("{0} &= {1}", inout(reg) m, const CAPTURE_MAX - 1, options(pure, nomem, nostack))
    };
    m as u32 + 1
}

/// A socket without state: gives it one if it is an established TCP connection that predates
/// the agent (a socket still in its handshake is left alone: counting starts at establishment,
/// when sock_ops creates the state).
#[inline(always)]
fn adopt(sk: *mut bpf_sock) -> *mut SkState {
    // SAFETY: helper with a socket pointer the verifier has typed.
    let full = unsafe { bpf_sk_fullsock(sk) };
    if full.is_null() {
        return core::ptr::null_mut();
    }
    // SAFETY: a full socket pointer checked for null.
    let (protocol, tcp_state) = unsafe { ((*full).protocol, (*full).state) };
    if protocol != IPPROTO_TCP
        || matches!(
            tcp_state,
            TCP_SYN_SENT | TCP_SYN_RECV | TCP_LISTEN | TCP_CLOSE | TCP_NEW_SYN_RECV
        )
    {
        return core::ptr::null_mut();
    }
    sk_state(full, Some(&SkState::new(ROLE_UNKNOWN)))
}

/// The hot line of the socket's slot, or `None` when its bytes go to the overflow counters.
#[inline(always)]
fn slot_of(st: &SkState) -> Option<*mut ConnHot> {
    if st.slot >= slot::IGNORED {
        return None;
    }
    let s = CONNS.get_ptr_mut(st.slot)?;
    // SAFETY: pointer into the array map, checked by the lookup.
    if unsafe { core::ptr::read_volatile(&raw const (*s).generation) } != st.generation {
        // The agent gave the slot back while the socket still sends: count, but in overflow.
        bump(stat::STALE_SLOT);
        return None;
    }
    CONN_HOT.get_ptr_mut(st.slot)
}

/// Who a new connection is, as the slot records it.
struct NewConn {
    key: TupleKey,
    cookie: u64,
    cgroup_id: u64,
    /// The socket's address as a number ([`sock_key`]) and its ports ([`sock_ports`]): its
    /// slot's placement key.
    sock: u64,
    ports: u32,
    /// Where counting starts: the next sequence numbers to send and to receive.
    snd_nxt: u32,
    rcv_nxt: u32,
    /// [`OWNER_FLAGS`] bits the slot starts with.
    flags: u64,
    /// The slot is published at once (its owner set): its cgroup is known.
    publish: bool,
}

/// A connection seen first by a packet (it predates the agent): its identity from the skb,
/// where counting starts from its TCP state.
#[inline(never)]
fn take_slot_from_skb(
    skb: *mut __sk_buff,
    sk: *mut bpf_sock,
    sock: u64,
    ports: u32,
    st: &mut SkState,
) {
    // SAFETY: helpers on the program's own skb and on its socket.
    let (cookie, cgroup_id, tp) = unsafe {
        (
            bpf_get_socket_cookie(skb.cast()),
            bpf_skb_cgroup_id(skb),
            bpf_tcp_sock(sk),
        )
    };
    if tp.is_null() {
        overflow(st);
        return;
    }
    // SAFETY: a TCP socket pointer checked for null.
    let (snd_nxt, rcv_nxt) = unsafe { ((*tp).snd_nxt, (*tp).rcv_nxt) };
    let mut conn = NewConn {
        key: TupleKey::default(),
        cookie,
        cgroup_id,
        sock,
        ports,
        snd_nxt,
        rcv_nxt,
        flags: 0,
        publish: true,
    };
    conn.key.family = tuple_of(sk, &mut conn.key);
    take_slot(st, &conn);
}

/// Cold path, once per connection: take a free slot and write the connection's identity.
#[inline(always)]
fn take_slot(st: &mut SkState, c: &NewConn) {
    let key = &c.key;
    let exclude_loopback = CONFIG.get(0).is_some_and(|c| c.exclude_loopback != 0);
    if exclude_loopback && is_loopback(key) {
        st.slot = slot::IGNORED;
        return;
    }
    let idx = outflow_place(c.sock, c.ports);
    if idx == NO_SLOT {
        overflow(st);
        return;
    }
    let (Some(s), Some(h)) = (CONNS.get_ptr_mut(idx), CONN_HOT.get_ptr_mut(idx)) else {
        overflow(st);
        return;
    };
    // SAFETY: pointers into the array maps; this CPU claimed the slot, so only it writes it now.
    let (s, h): (&mut ConnSlot, &mut ConnHot) = unsafe { (&mut *s, &mut *h) };
    let generation = s.generation;
    h.owner = c.flags;
    h.counters = Counters::default();
    h.snd_max = c.snd_nxt;
    h.rcv_max = c.rcv_nxt;
    s.reported = Counters::default();
    s.cookie = c.cookie;
    s.cgroup_id = c.cgroup_id;
    // SAFETY: helper without arguments.
    s.first_seen_ns = unsafe { bpf_ktime_get_boot_ns() };
    s.last_seen_ns = 0;
    s.local_addr = key.local_addr;
    s.remote_addr = key.remote_addr;
    s.local_port = key.local_port;
    s.remote_port = key.remote_port;
    s.family = key.family;
    s.role = st.role as u8;
    s.turn = 0;
    s.lost_turn = 0;
    // The identity must be written before the agent can see the slot live. An empty asm block
    // is a compiler barrier (BPF has no fence instruction; x86 keeps stores in order).
    // SAFETY: emits no instruction.
    unsafe { core::arch::asm!("", options(nostack, preserves_flags)) };
    // SAFETY: aligned field of the slot.
    unsafe { core::ptr::write_volatile(&raw mut s.state, SLOT_LIVE) };
    if c.publish && placeable(c.sock) {
        // SAFETY: aligned field of the hot line.
        unsafe { core::ptr::write_volatile(&raw mut h.owner, c.sock | c.flags) };
    }
    st.slot = idx;
    st.generation = generation;

    if st.role == u32::from(ROLE_UNKNOWN) {
        // sock_ops will not see this connection close; the state tracepoint will, by socket.
        track_legacy_close(c.sock, idx, generation);
    }
}

/// Registers a connection that predates the agent with the close tracepoint. A function of its
/// own so that its key and value are not on the stack of the slot taker: Linux 5.10 refuses a
/// call chain whose stacks add up to more than 512 bytes.
#[inline(never)]
fn track_legacy_close(sock: u64, slot: u32, generation: u32) {
    let r = SlotRef { slot, generation };
    if sock == 0 || LEGACY.insert(sock, r, 0).is_err() {
        bump(stat::LEGACY_UNTRACKED);
    }
}

/// Once per connection taken by sock_ops: the socket's cgroup, from its first packet.
#[inline(never)]
fn set_cgroup(skb: *mut __sk_buff, st: &mut SkState) {
    st.flags &= !SK_NEED_CGROUP;
    if st.slot >= slot::IGNORED {
        return;
    }
    if let Some(s) = CONNS.get_ptr_mut(st.slot) {
        // SAFETY: pointer into the array map; helper on the program's own skb.
        unsafe { (*s).cgroup_id = bpf_skb_cgroup_id(skb) };
    }
}

/// Claims a free slot for the socket `sock`: one of its home group's if one is free, else the
/// first free one of the next [`SLOT_PLACE_GROUPS`] groups (found later through the socket's
/// storage). First clears, in the home group, any owner left by a socket at the same address
/// whose close was not seen (it would catch this socket's packets).
///
/// A global function (exported, C ABI, scalar arguments and result): the verifier checks it
/// once, on its own, instead of again for every state a caller reaches it in. Its 136-step
/// search made up most of what the verifier walked in the per-packet programs (about 200,000
/// of 235,000 instructions each) while it was a static function.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn outflow_place(sock: u64, ports: u32) -> u32 {
    place(sock, ports).unwrap_or(NO_SLOT)
}

/// [`outflow_place`]'s result when no slot is free.
const NO_SLOT: u32 = u32::MAX;

#[inline(always)]
fn place(sock: u64, ports: u32) -> Option<u32> {
    let groups = CONFIG.get(0)?.slot_groups;
    if groups == 0 {
        return None;
    }
    let usable = placeable(sock);
    let home = home_group(sock, ports, groups);
    if usable {
        let base = home * SLOT_GROUP;
        let mut i = 0;
        while i < SLOT_GROUP {
            if let Some(h) = CONN_HOT.get_ptr_mut(base + i) {
                // SAFETY: pointer into the array map.
                unsafe {
                    let owner = &raw mut (*h).owner;
                    if core::ptr::read_volatile(owner) & !OWNER_FLAGS == sock {
                        core::ptr::write_volatile(owner, 0);
                        bump(stat::STALE_OWNERS);
                    }
                }
            }
            i += 1;
        }
    }
    let mut g = 0;
    while g < SLOT_PLACE_GROUPS {
        let base = ((home + g) % groups) * SLOT_GROUP;
        let mut i = 0;
        while i < SLOT_GROUP {
            let idx = base + i;
            if let Some(s) = CONNS.get_ptr(idx) {
                // SAFETY: pointer into the array map.
                let free = unsafe { core::ptr::read_volatile(&raw const (*s).state) } == SLOT_FREE;
                if free && SLOT_CLAIMS.insert(idx, 0, u64::from(BPF_NOEXIST)).is_ok() {
                    if g != 0 || !usable {
                        bump(stat::PLACED_AWAY);
                    }
                    return Some(idx);
                }
            }
            i += 1;
        }
        g += 1;
    }
    None
}

#[inline(always)]
fn overflow(st: &mut SkState) {
    st.slot = slot::OVERFLOW;
    bump(stat::CONNS_OVERFLOWED);
}

#[inline(always)]
fn bump(index: u32) {
    if let Some(v) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU array value: only this CPU writes it.
        unsafe { *v += 1 };
    }
}

/// The socket's addresses and ports into `key`; returns its family. Not inlined, so that its
/// temporaries are not on the stack of the slot taker: Linux 5.10 refuses a call chain whose
/// stacks add up to more than 512 bytes. It returns a number, not nothing, because 5.10 also
/// refuses a function that returns with a stack pointer in R0 (what LLVM may leave there).
#[inline(never)]
fn tuple_of(sk: *mut bpf_sock, key: &mut TupleKey) -> u16 {
    // SAFETY: a full socket pointer; the fields are readable from cgroup_skb.
    unsafe {
        let family = (*sk).family as u16;
        key.local_port = (*sk).src_port as u16;
        key.remote_port = u16::from_be((*sk).dst_port);
        if family == AF_INET6 {
            // Field by field: the verifier forbids pointer arithmetic on a socket pointer.
            key.local_addr = ip6_bytes(&[
                read_field(&raw const (*sk).src_ip6[0]),
                read_field(&raw const (*sk).src_ip6[1]),
                read_field(&raw const (*sk).src_ip6[2]),
                read_field(&raw const (*sk).src_ip6[3]),
            ]);
            key.remote_addr = ip6_bytes(&[
                read_field(&raw const (*sk).dst_ip6[0]),
                read_field(&raw const (*sk).dst_ip6[1]),
                read_field(&raw const (*sk).dst_ip6[2]),
                read_field(&raw const (*sk).dst_ip6[3]),
            ]);
        } else {
            put4(&mut key.local_addr, (*sk).src_ip4);
            put4(&mut key.remote_addr, (*sk).dst_ip4);
        }
        family
    }
}

/// One load at a constant offset from a context or socket pointer.
#[inline(always)]
unsafe fn read_field(p: *const u32) -> u32 {
    // SAFETY: the caller passes the address of a readable field.
    unsafe { core::ptr::read_volatile(p) }
}

#[inline(always)]
fn put4(dst: &mut [u8; 16], be: u32) {
    let b = be.to_ne_bytes();
    dst[0] = b[0];
    dst[1] = b[1];
    dst[2] = b[2];
    dst[3] = b[3];
}

#[inline(always)]
fn ip6_bytes(words: &[u32; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = words[i].to_ne_bytes();
        out[i * 4] = b[0];
        out[i * 4 + 1] = b[1];
        out[i * 4 + 2] = b[2];
        out[i * 4 + 3] = b[3];
        i += 1;
    }
    out
}

/// The socket's remote address is loopback (read from the socket, which the stack has just
/// used: no cache miss).
#[inline(always)]
fn sock_is_loopback(sk: *mut bpf_sock) -> bool {
    // SAFETY: fields of the socket's common part, readable from cgroup_skb.
    unsafe {
        let family = (*sk).family;
        if family == u32::from(AF_INET) {
            return (*sk).dst_ip4.to_ne_bytes()[0] == 127;
        }
        if family != u32::from(AF_INET6) {
            return false;
        }
        let w = [
            read_field(&raw const (*sk).dst_ip6[0]),
            read_field(&raw const (*sk).dst_ip6[1]),
            read_field(&raw const (*sk).dst_ip6[2]),
            read_field(&raw const (*sk).dst_ip6[3]),
        ];
        let key = TupleKey {
            remote_addr: ip6_bytes(&w),
            family: AF_INET6,
            ..TupleKey::default()
        };
        is_loopback(&key)
    }
}

/// 127.0.0.0/8, ::1 and ::ffff:127.0.0.0/104.
#[inline(always)]
fn is_loopback(key: &TupleKey) -> bool {
    let a = &key.remote_addr;
    if key.family == AF_INET {
        return a[0] == 127;
    }
    let zero10 = a[..10].iter().all(|b| *b == 0);
    if zero10 && a[10] == 0xff && a[11] == 0xff {
        return a[12] == 127;
    }
    zero10 && a[10] == 0 && a[11] == 0 && a[12..15].iter().all(|b| *b == 0) && a[15] == 1
}

#[sock_ops]
pub fn sock_ops(ctx: SockOpsContext) -> u32 {
    // SAFETY: the program's context.
    let ops = unsafe { &*ctx.ops };
    let op = ops.op;
    // SAFETY: reading the socket pointer of the context; may be null.
    let sk = unsafe { ops.__bindgen_anon_2.sk };
    if sk.is_null() {
        return 1;
    }
    match op {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB | BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            let role = if op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
                ROLE_SERVER
            } else {
                ROLE_CLIENT
            };
            let st = sk_state(sk, Some(&SkState::new(role)));
            if !st.is_null() {
                // SAFETY: non-null storage pointer.
                let st = unsafe { &mut *st };
                st.role = u32::from(role);
                // The client speaks first: its first payload starts turn 1.
                let flags =
                    if role == ROLE_SERVER && CONFIG.get(0).is_some_and(|c| c.capture_bytes != 0) {
                        OWNER_CAPTURE | OWNER_AWAIT_TURN
                    } else {
                        0
                    };
                if st.slot == slot::UNALLOCATED {
                    // Take the slot now: no other CPU can count this socket's packets yet
                    // (until now it was in a handshake state, which the packet path skips).
                    // Its first packet writes its cgroup and publishes it.
                    let conn = conn_of_ops(&ctx, sock_key(sk), sock_ports(sk), flags);
                    take_slot(st, &conn);
                    st.flags |= SK_NEED_CGROUP;
                }
            }
            // SAFETY: helper on the program's own context.
            unsafe {
                bpf_sock_ops_cb_flags_set(
                    ctx.ops,
                    (ops.bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG) as i32,
                )
            };
        }
        BPF_SOCK_OPS_STATE_CB => {
            // SAFETY: args of a state callback: [old state, new state].
            let new_state = unsafe { ops.__bindgen_anon_1.args[1] };
            if new_state == TCP_CLOSE {
                let st = sk_state(sk, None);
                if !st.is_null() {
                    // SAFETY: non-null storage pointer.
                    let st = unsafe { &*st };
                    close_slot(st.slot, st.generation);
                    sk_state_delete(sk);
                }
            }
        }
        _ => {}
    }
    1
}

/// Identity of an establishing connection, from the sock_ops context; `sock` and `ports` its
/// placement key, `flags` the slot's first [`OWNER_FLAGS`].
#[inline(always)]
fn conn_of_ops(ctx: &SockOpsContext, sock: u64, ports: u32, flags: u64) -> NewConn {
    // SAFETY: fields of the program's context; helpers on it and on its socket.
    unsafe {
        let ops = &*ctx.ops;
        let family = ops.family as u16;
        let mut key = TupleKey {
            local_port: ops.local_port as u16,
            // The context holds the remote port in network order in its upper 16 bits.
            remote_port: u32::from_be(ops.remote_port) as u16,
            family,
            ..TupleKey::default()
        };
        if family == AF_INET6 {
            let o = ctx.ops;
            key.local_addr = ip6_bytes(&[
                read_field(&raw const (*o).local_ip6[0]),
                read_field(&raw const (*o).local_ip6[1]),
                read_field(&raw const (*o).local_ip6[2]),
                read_field(&raw const (*o).local_ip6[3]),
            ]);
            key.remote_addr = ip6_bytes(&[
                read_field(&raw const (*o).remote_ip6[0]),
                read_field(&raw const (*o).remote_ip6[1]),
                read_field(&raw const (*o).remote_ip6[2]),
                read_field(&raw const (*o).remote_ip6[3]),
            ]);
        } else {
            put4(&mut key.local_addr, ops.local_ip4);
            put4(&mut key.remote_addr, ops.remote_ip4);
        }
        NewConn {
            key,
            cookie: bpf_get_socket_cookie(ctx.ops.cast()),
            cgroup_id: 0,
            sock,
            ports,
            snd_nxt: ops.snd_nxt,
            rcv_nxt: ops.rcv_nxt,
            flags,
            publish: false,
        }
    }
}

/// Marks a slot final: the agent reports its counts once more, with `closed`, and frees it.
#[inline(always)]
fn close_slot(idx: u32, generation: u32) {
    if idx == slot::OVERFLOW {
        bump(stat::OVERFLOW_CLOSED);
        return;
    }
    if idx >= slot::IGNORED {
        return;
    }
    if let (Some(s), Some(h)) = (CONNS.get_ptr_mut(idx), CONN_HOT.get_ptr_mut(idx)) {
        // SAFETY: pointers into the array maps.
        unsafe {
            if (*s).generation == generation && (*s).state == SLOT_LIVE {
                // Unpublished first (the socket's memory may soon be another socket's), then
                // final.
                core::ptr::write_volatile(&raw mut (*h).owner, 0);
                core::ptr::write_volatile(&raw mut (*s).state, SLOT_CLOSED);
            }
        }
    }
}

/// Arguments of the `inet_sock_set_state` tracepoint (its `TP_PROTO`): the socket, the old state,
/// the new state.
const TP_ARG_SOCK: usize = 0;
const TP_ARG_NEWSTATE: usize = 2;

/// Raw tracepoint: its link is a BPF link (pinnable) on every kernel since 5.7, where a
/// tracepoint's perf link needs 5.15, and it reads the socket's address straight from its
/// arguments (no record to fill).
#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn sock_close(ctx: RawTracePointContext) -> i32 {
    let newstate: u64 = ctx.arg(TP_ARG_NEWSTATE);
    if newstate as u32 != TCP_CLOSE {
        return 0;
    }
    // Only TCP sockets are in LEGACY (the tracepoint also fires for other protocols).
    let sock: u64 = ctx.arg(TP_ARG_SOCK);
    if let Some(r) = LEGACY.get_ptr(sock) {
        // SAFETY: a value of the map, copied out at once.
        let r = unsafe { *r };
        close_slot(r.slot, r.generation);
        let _ = LEGACY.remove(sock);
    }
    0
}

/// The annotation API: `setsockopt(fd, SOL_OUTFLOW, OUTFLOW_CLIENT_ID, value, len)` from the
/// serving application tags what its socket sends from now on with a client id. Other levels
/// pass through untouched; the kernel never sees this level (it would refuse it).
#[cgroup_sockopt(setsockopt)]
pub fn annotate(ctx: SockoptContext) -> i32 {
    let so = ctx.sockopt;
    // SAFETY: the program's context.
    let (level, optname) = unsafe { ((*so).level, (*so).optname) };
    if level != SOL_OUTFLOW {
        return 1;
    }
    if optname != OUTFLOW_CLIENT_ID {
        // Refused: the caller gets EPERM for an option this agent does not know.
        return 0;
    }
    annotate_socket(&ctx);
    // Handled here: return to the caller without the kernel's own handler.
    // SAFETY: the program's context; optlen is writable from setsockopt programs.
    unsafe { (*so).optlen = -1 };
    1
}

#[inline(always)]
fn annotate_socket(ctx: &SockoptContext) {
    let so = ctx.sockopt;
    // SAFETY: the program's context; the socket may be null.
    let sk = unsafe { (*so).__bindgen_anon_1.sk };
    if sk.is_null() {
        bump(stat::ANNOTATIONS_UNTRACKED);
        return;
    }
    let st = sk_state(sk, None);
    if st.is_null() {
        bump(stat::ANNOTATIONS_UNTRACKED);
        return;
    }
    // SAFETY: non-null socket storage pointer.
    let st = unsafe { &*st };
    let (Some(s), Some(h)) = (if st.slot < slot::IGNORED {
        (CONNS.get_ptr_mut(st.slot), CONN_HOT.get_ptr_mut(st.slot))
    } else {
        (None, None)
    }) else {
        bump(stat::ANNOTATIONS_UNTRACKED);
        return;
    };
    let Some(e) = EVENT_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's scratch event; the slot pointer from the map; the option value is
    // read byte by byte within [optval, optval_end).
    let n = unsafe {
        (*e).slot = st.slot;
        (*e).generation = st.generation;
        (*e).turn = st.turn;
        (*e).kind = EVENT_ANNOTATION;
        (*e).at = (*h).counters;
        let start = (*so).__bindgen_anon_2.optval as usize;
        let end = (*so).__bindgen_anon_3.optval_end as usize;
        let optlen = (*so).optlen;
        let mut n = 0usize;
        while n < ANNOTATION_MAX {
            let p = start + n;
            if n as i32 >= optlen || p + 1 > end {
                break;
            }
            (*e).data[n] = *(p as *const u8);
            n += 1;
        }
        (*e).len = n as u16;
        n as u32
    };
    if !output(e, n) {
        bump(stat::ANNOTATIONS_LOST);
        // The bytes from here on cannot be attributed: the agent treats the turn as lost.
        // SAFETY: pointer into the array map.
        unsafe { core::ptr::write_volatile(&raw mut (*s).lost_turn, st.turn) };
    }
}
