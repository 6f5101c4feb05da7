//! Reads what the counters need from a packet's IP and TCP headers (direct packet access:
//! cgroup_skb data starts at the IP header, in both directions).
use aya_ebpf::bindings::__sk_buff;

const IPPROTO_TCP: u8 = 6;
const IPPROTO_HOPOPTS: u8 = 0;

pub struct Packet {
    /// The IP and TCP headers were read.
    pub parsed: bool,
    /// TCP sequence number of the first payload byte.
    pub seq: u32,
    /// L4 payload bytes in this skb (all its segments).
    pub payload: u32,
    /// Offset of the first payload byte from the start of the packet (the IP header).
    pub payload_offset: u32,
    /// IP bytes on the wire: one IP+TCP header per segment.
    pub wire_bytes: u64,
    /// Segments in this skb (a GSO/GRO skb carries many).
    pub segments: u64,
}

#[inline(always)]
pub fn parse(skb: *mut __sk_buff) -> Packet {
    // SAFETY: `skb` is the program's context.
    let (len, gso_segs, data, data_end) = unsafe {
        (
            (*skb).len,
            (*skb).gso_segs,
            (*skb).data as usize,
            (*skb).data_end as usize,
        )
    };
    let segments = if gso_segs > 1 { gso_segs } else { 1 };
    let unparsed = Packet {
        parsed: false,
        seq: 0,
        payload: 0,
        payload_offset: 0,
        wire_bytes: u64::from(len),
        segments: u64::from(segments),
    };
    let Some((l4_off, doff, seq)) = headers(data, data_end) else {
        return unparsed;
    };
    let hdrs = l4_off + doff;
    if len < hdrs {
        return unparsed;
    }
    Packet {
        parsed: true,
        seq,
        payload: len - hdrs,
        payload_offset: hdrs,
        wire_bytes: u64::from(len) + u64::from(segments - 1) * u64::from(hdrs),
        segments: u64::from(segments),
    }
}

/// (offset of the TCP header, TCP header length, sequence number).
#[inline(always)]
fn headers(data: usize, data_end: usize) -> Option<(u32, u32, u32)> {
    if data + 40 > data_end {
        return None;
    }
    // SAFETY: bounds checked against data_end above (the verifier checks it too).
    let vihl = unsafe { *(data as *const u8) };
    let l4_off = match vihl >> 4 {
        4 => {
            // SAFETY: within the 40 bytes checked above.
            if unsafe { *((data + 9) as *const u8) } != IPPROTO_TCP {
                return None;
            }
            u32::from(vihl & 0x0f) * 4
        }
        6 => {
            // SAFETY: within the 40 bytes checked above.
            match unsafe { *((data + 6) as *const u8) } {
                IPPROTO_TCP => 40,
                // One Hop-by-Hop header (IPv6 BIG TCP puts a jumbo option there); other
                // extension headers are not walked (counted as unparsed).
                IPPROTO_HOPOPTS => {
                    let hbh = data + 40;
                    if hbh + 2 > data_end {
                        return None;
                    }
                    // SAFETY: bounds checked just above.
                    let (next, len) = unsafe { (*(hbh as *const u8), *((hbh + 1) as *const u8)) };
                    if next != IPPROTO_TCP {
                        return None;
                    }
                    40 + (u32::from(len) + 1) * 8
                }
                _ => return None,
            }
        }
        _ => return None,
    };
    if l4_off < 20 {
        return None;
    }
    let tcp = data + l4_off as usize;
    if tcp + 20 > data_end {
        return None;
    }
    // SAFETY: bounds checked above.
    let (seq, doff) = unsafe {
        (
            u32::from_be(core::ptr::read_unaligned((tcp + 4) as *const u32)),
            u32::from(*((tcp + 12) as *const u8) >> 4) * 4,
        )
    };
    Some((l4_off, doff, seq))
}
