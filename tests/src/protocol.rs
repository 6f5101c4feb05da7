//! The request/response protocol between [`crate::peer::Client`] and `outflow-testpeer`, the
//! JSON line the peer prints per connection, and `TCP_INFO`.
//!
//! A connection carries exactly one exchange:
//! 1. client → server: a 24-byte [`RequestHeader`], then `req_len` bytes of body;
//! 2. server → client: `resp_len` bytes, all at once or in chunks of `chunk` bytes with
//!    `interval_ms` pauses between them (a token stream);
//! 3. client → server: one "done" byte, sent after the whole response arrived. Its ACK field
//!    acknowledges every response byte, so once the server has read it the server's
//!    `TCP_INFO` counters are final for the data;
//! 4. the server reports its [`ServerResult`] and closes; the client reads EOF and closes.

use std::io::{self, Write};
use std::mem::{offset_of, size_of};
use std::net::{IpAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::thread;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Size of the encoded [`RequestHeader`].
pub const HEADER_LEN: usize = 24;

/// The byte the client sends after receiving the whole response.
pub const DONE_BYTE: u8 = b'.';

/// What the client asks of the server; sent big-endian as
/// `resp_len u64, req_len u64, chunk u32, interval_ms u32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// Bytes the server sends back.
    pub resp_len: u64,
    /// Bytes of request body that follow the header.
    pub req_len: u64,
    /// If non-zero, the server writes the response in chunks of this many bytes.
    pub chunk: u32,
    /// Pause between chunks, in milliseconds.
    pub interval_ms: u32,
}

impl RequestHeader {
    /// The header as sent on the wire.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0; HEADER_LEN];
        out[0..8].copy_from_slice(&self.resp_len.to_be_bytes());
        out[8..16].copy_from_slice(&self.req_len.to_be_bytes());
        out[16..20].copy_from_slice(&self.chunk.to_be_bytes());
        out[20..24].copy_from_slice(&self.interval_ms.to_be_bytes());
        out
    }

    /// Parses a header received from the wire.
    pub fn decode(bytes: &[u8; HEADER_LEN]) -> Self {
        let u64_at = |at: usize| u64::from_be_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        let u32_at = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
        Self {
            resp_len: u64_at(0),
            req_len: u64_at(8),
            chunk: u32_at(16),
            interval_ms: u32_at(20),
        }
    }

    /// Payload bytes the client sends in the whole exchange: header, body and done byte.
    pub fn client_bytes(&self) -> u64 {
        HEADER_LEN as u64 + self.req_len + 1
    }
}

/// The JSON line `outflow-testpeer` prints for each finished connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerResult {
    /// The server's port.
    pub local_port: u16,
    /// The client's address.
    pub remote_addr: IpAddr,
    /// The client's port.
    pub remote_port: u16,
    /// Payload bytes the server wrote (`resp_len`).
    pub sent: u64,
    /// Payload bytes the server read (`24 + req_len + 1`).
    pub received: u64,
    /// `tcpi_bytes_acked`: payload bytes the client acknowledged.
    pub bytes_acked: u64,
    /// `tcpi_bytes_received`: payload bytes received in order.
    pub bytes_received: u64,
    /// `tcpi_segs_out`: segments sent, retransmissions and pure ACKs included.
    pub segs_out: u32,
    /// `tcpi_segs_in`: segments received.
    pub segs_in: u32,
    /// `tcpi_total_retrans`: segments retransmitted.
    pub total_retrans: u32,
}

/// The start of the kernel's `struct tcp_info` (include/uapi/linux/tcp.h), up to
/// `tcpi_segs_in` (Linux 4.2); later kernels append fields, which `TCP_INFO` leaves out
/// when asked for this size.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct TcpInfo {
    /// `tcpi_state` .. `tcpi_options`, the wscale and app-limited bit fields.
    pub small: [u8; 8],
    /// `tcpi_rto`, in microseconds.
    pub rto: u32,
    /// `tcpi_ato`.
    pub ato: u32,
    /// `tcpi_snd_mss`.
    pub snd_mss: u32,
    /// `tcpi_rcv_mss`.
    pub rcv_mss: u32,
    /// `tcpi_unacked`.
    pub unacked: u32,
    /// `tcpi_sacked`.
    pub sacked: u32,
    /// `tcpi_lost`.
    pub lost: u32,
    /// `tcpi_retrans`.
    pub retrans: u32,
    /// `tcpi_fackets`.
    pub fackets: u32,
    /// `tcpi_last_data_sent`.
    pub last_data_sent: u32,
    /// `tcpi_last_ack_sent`.
    pub last_ack_sent: u32,
    /// `tcpi_last_data_recv`.
    pub last_data_recv: u32,
    /// `tcpi_last_ack_recv`.
    pub last_ack_recv: u32,
    /// `tcpi_pmtu`.
    pub pmtu: u32,
    /// `tcpi_rcv_ssthresh`.
    pub rcv_ssthresh: u32,
    /// `tcpi_rtt`.
    pub rtt: u32,
    /// `tcpi_rttvar`.
    pub rttvar: u32,
    /// `tcpi_snd_ssthresh`.
    pub snd_ssthresh: u32,
    /// `tcpi_snd_cwnd`.
    pub snd_cwnd: u32,
    /// `tcpi_advmss`.
    pub advmss: u32,
    /// `tcpi_reordering`.
    pub reordering: u32,
    /// `tcpi_rcv_rtt`.
    pub rcv_rtt: u32,
    /// `tcpi_rcv_space`.
    pub rcv_space: u32,
    /// `tcpi_total_retrans`.
    pub total_retrans: u32,
    /// `tcpi_pacing_rate`.
    pub pacing_rate: u64,
    /// `tcpi_max_pacing_rate`.
    pub max_pacing_rate: u64,
    /// `tcpi_bytes_acked` (RFC 4898 tcpEStatsAppHCThruOctetsAcked).
    pub bytes_acked: u64,
    /// `tcpi_bytes_received` (RFC 4898 tcpEStatsAppHCThruOctetsReceived).
    pub bytes_received: u64,
    /// `tcpi_segs_out` (RFC 4898 tcpEStatsPerfSegsOut).
    pub segs_out: u32,
    /// `tcpi_segs_in` (RFC 4898 tcpEStatsPerfSegsIn).
    pub segs_in: u32,
}

const _: () = assert!(offset_of!(TcpInfo, rto) == 8);
const _: () = assert!(offset_of!(TcpInfo, total_retrans) == 100);
const _: () = assert!(offset_of!(TcpInfo, pacing_rate) == 104);
const _: () = assert!(offset_of!(TcpInfo, bytes_acked) == 120);
const _: () = assert!(offset_of!(TcpInfo, bytes_received) == 128);
const _: () = assert!(offset_of!(TcpInfo, segs_in) == 140);
const _: () = assert!(size_of::<TcpInfo>() == 144);

/// Reads `TCP_INFO` of a connected socket. Fails if the kernel returns less than
/// [`TcpInfo`] (kernels before 4.2).
pub fn tcp_info(stream: &TcpStream) -> io::Result<TcpInfo> {
    let mut info = TcpInfo::default();
    let mut len = libc::socklen_t::try_from(size_of::<TcpInfo>()).expect("144 fits in socklen_t");
    // SAFETY: `info` is a writable buffer of `len` bytes and `len` is a valid in/out length.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast::<libc::c_void>(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if (len as usize) < size_of::<TcpInfo>() {
        return Err(io::Error::other(format!(
            "TCP_INFO returned {len} bytes, need {}",
            size_of::<TcpInfo>()
        )));
    }
    Ok(info)
}

/// Writes `len` pseudo-random bytes, seeded by `seed`: at once if `chunk` is 0, else in
/// chunks of `chunk` bytes with `interval` pauses between them.
pub fn write_payload(
    out: &mut impl Write,
    seed: u64,
    len: u64,
    chunk: u32,
    interval: Duration,
) -> io::Result<()> {
    const BLOCK: usize = 64 * 1024;
    let mut block = vec![0u8; BLOCK];
    // xorshift64: cheap bytes that no link layer could compress; the seed must be non-zero.
    let mut state = seed | 1;
    for word in block.chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        word.copy_from_slice(&state.to_le_bytes()[..word.len()]);
    }
    let step = if chunk == 0 {
        BLOCK as u64
    } else {
        u64::from(chunk)
    };
    let mut written = 0u64;
    let mut offset = 0usize;
    while written < len {
        if chunk != 0 && written > 0 && !interval.is_zero() {
            thread::sleep(interval);
        }
        // One chunk, possibly wrapping around the block.
        let mut left = step.min(len - written);
        while left > 0 {
            let n = usize::try_from(left)
                .unwrap_or(usize::MAX)
                .min(BLOCK - offset);
            out.write_all(&block[offset..offset + n])?;
            offset = (offset + n) % BLOCK;
            left -= n as u64;
            written += n as u64;
        }
    }
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let header = RequestHeader {
            resp_len: 5_000_000,
            req_len: 7,
            chunk: 64,
            interval_ms: 20,
        };
        let bytes = header.encode();
        assert_eq!(&bytes[0..8], &5_000_000u64.to_be_bytes());
        assert_eq!(RequestHeader::decode(&bytes), header);
        assert_eq!(header.client_bytes(), 24 + 7 + 1);
    }

    #[test]
    fn payload_has_the_requested_length() {
        for (len, chunk) in [
            (0, 0),
            (1, 0),
            (100_000, 0),
            (100_000, 1000),
            (70_000, 65_537),
        ] {
            let mut out = Vec::new();
            write_payload(&mut out, 42, len, chunk, Duration::ZERO).expect("writing to a Vec");
            assert_eq!(out.len() as u64, len, "len {len} chunk {chunk}");
        }
    }
}
