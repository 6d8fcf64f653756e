//! Sending: a run of datagrams to one peer, all of one size but the last, leaves as one
//! UDP GSO message, which the kernel routes, filters and accounts once and cuts into
//! datagrams only at the device (or in the NIC). Several messages go per `sendmmsg`.

use std::io;

use super::sys::{self, CmsgBuf, RawAddr};
use crate::engine::Transmit;

/// Messages per `sendmmsg` call.
const SEND_MSGS: usize = 64;
/// Most datagrams in one GSO message: the kernel's UDP_MAX_SEGMENTS (64 before 6.10, 128
/// since).
const GSO_MAX_SEGMENTS: usize = 64;
/// Most payload bytes in one GSO message: the whole must fit one IP packet's 16-bit length
/// with its headers.
const GSO_MAX_BYTES: usize = 65_000;
/// Longest a full send buffer may hold up a round before the rest of it is dropped.
const SEND_WAIT_MS: i32 = 20;

/// How many of `rest`'s leading transmits one GSO message can carry: same peer, the same
/// length but the last, which may be shorter, within the kernel's limits. At least one
/// when `rest` is not empty.
fn group_len(rest: &[Transmit]) -> usize {
    let Some(first) = rest.first() else { return 0 };
    let size = first.payload.len();
    // An empty datagram cannot be a segment: nothing would mark where it was.
    if size == 0 {
        return 1;
    }
    let mut n = 1;
    let mut total = size;
    for t in &rest[1..] {
        let len = t.payload.len();
        if n == GSO_MAX_SEGMENTS || t.peer != first.peer || len == 0 || len > size || total + len > GSO_MAX_BYTES {
            break;
        }
        n += 1;
        total += len;
        // Only the last segment may be shorter: the kernel cuts at every `size` bytes.
        if len < size {
            break;
        }
    }
    n
}

/// How a round ended.
pub(super) enum Sent {
    /// Every transmit of the round was sent, skipped after an ICMP error, or dropped
    /// (`dropped` of them) because the send buffer stayed full.
    All { dropped: usize },
    /// The kernel refused a GSO message; the transmits before `resume` were handled.
    GsoRefused { resume: usize, error: io::Error },
}

/// Reused headers for `sendmmsg`: built for each round, pointing into the caller's
/// payloads, so a send allocates nothing and copies no payload in user space.
pub(super) struct SendState {
    msgs: Vec<libc::mmsghdr>,
    /// One per datagram; a message's buffers are consecutive.
    iovs: Vec<libc::iovec>,
    /// One per message slot, written in place.
    addrs: Vec<(RawAddr, libc::socklen_t)>,
    cmsgs: Vec<CmsgBuf>,
    /// Where each message's datagrams start among the round's transmits, then where the
    /// round ends.
    starts: Vec<usize>,
    /// Each message's GSO segment size; 0 for a message of one datagram.
    segments: Vec<u16>,
}

// SAFETY: the raw pointers in `msgs` and `iovs` are rewritten before every system call
// and only dereferenced by the kernel during it; between calls nothing reads them, so the
// state may move to another thread with its Mutex.
unsafe impl Send for SendState {}

impl SendState {
    pub(super) fn new() -> SendState {
        SendState {
            msgs: Vec::with_capacity(SEND_MSGS),
            iovs: Vec::with_capacity(SEND_MSGS * GSO_MAX_SEGMENTS),
            addrs: vec![(RawAddr::zeroed(), 0); SEND_MSGS],
            cmsgs: vec![CmsgBuf::ZERO; SEND_MSGS],
            starts: Vec::with_capacity(SEND_MSGS + 1),
            segments: Vec::with_capacity(SEND_MSGS),
        }
    }

    /// Builds the next round from the head of `batch`: up to [`SEND_MSGS`] messages, each
    /// a GSO group when `gso`, else one datagram. Returns how many transmits it covers.
    pub(super) fn prepare(&mut self, batch: &[Transmit], gso: bool) -> usize {
        self.msgs.clear();
        self.iovs.clear();
        self.starts.clear();
        self.segments.clear();
        let mut i = 0;
        while i < batch.len() && self.segments.len() < SEND_MSGS {
            let n = if gso { group_len(&batch[i..]) } else { 1 };
            let m = self.segments.len();
            self.starts.push(i);
            self.addrs[m] = sys::to_raw(batch[i].peer);
            // group_len keeps two or more segments within GSO_MAX_BYTES: the size fits.
            self.segments
                .push(if n > 1 { batch[i].payload.len() as u16 } else { 0 });
            self.iovs.extend(batch[i..i + n].iter().map(|t| libc::iovec {
                iov_base: t.payload.as_ptr() as *mut libc::c_void,
                iov_len: t.payload.len(),
            }));
            i += n;
        }
        self.starts.push(i);
        // Headers last: the vectors they point into no longer grow.
        for (m, &segment) in self.segments.iter().enumerate() {
            let (addr, addrlen) = &mut self.addrs[m];
            let iovs = &mut self.iovs[self.starts[m]..self.starts[m + 1]];
            let control = (segment != 0).then_some(&mut self.cmsgs[m]);
            let mut msg = sys::message(addr, *addrlen, iovs.as_mut_ptr(), iovs.len(), control);
            if segment != 0 {
                sys::set_segment_size(&mut msg, segment);
            }
            self.msgs.push(msg);
        }
        i
    }

    /// Sends the prepared round. A full send buffer gets [`SEND_WAIT_MS`] to drain: KCP
    /// bursts a whole window at once, and the kernel caps SO_SNDBUF without
    /// CAP_NET_ADMIN, so a short wait beats dropping what would only be retransmitted.
    pub(super) fn transmit(&mut self, fd: i32) -> io::Result<Sent> {
        let count = self.msgs.len();
        let mut done = 0;
        while done < count {
            match sys::sendmmsg(fd, &mut self.msgs[done..]) {
                // A UDP message goes whole or not at all; 0 cannot happen but must not spin.
                Ok(n) => done += n.max(1),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if !sys::wait_writable(fd, SEND_WAIT_MS) {
                        let dropped = self.starts[count] - self.starts[done];
                        return Ok(Sent::All { dropped });
                    }
                }
                // A peer's ICMP error surfaces here on the next call; skip that message.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => done += 1,
                Err(e) if self.segments[done] != 0 && refuses_gso(&e) => {
                    let resume = self.starts[done];
                    return Ok(Sent::GsoRefused { resume, error: e });
                }
                Err(e) => return Err(e),
            }
        }
        Ok(Sent::All { dropped: 0 })
    }
}

/// Whether a GSO message failed for being GSO: no offload for the protocol or route
/// (EIO: IPsec), checksums off on the socket (EINVAL), a segment over the path MTU
/// (EMSGSIZE), or a kernel without UDP_SEGMENT (ENOPROTOOPT, EOPNOTSUPP).
fn refuses_gso(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EIO | libc::EINVAL | libc::EMSGSIZE | libc::ENOPROTOOPT | libc::EOPNOTSUPP)
    )
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;

    fn run(peer: SocketAddr, lens: &[usize]) -> Vec<Transmit> {
        lens.iter()
            .map(|&len| Transmit {
                peer,
                path: crate::engine::PathId(0),
                payload: vec![0; len],
            })
            .collect()
    }

    #[test]
    fn groups_follow_the_gso_rules() {
        let p: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let q: SocketAddr = "127.0.0.1:2".parse().unwrap();
        // Equal sizes, then a shorter last one ends the group.
        assert_eq!(group_len(&run(p, &[1000, 1000, 1000, 400, 1000])), 4);
        // A longer datagram starts a new group.
        assert_eq!(group_len(&run(p, &[1000, 1000, 1200, 1200])), 2);
        // Another peer starts a new group.
        let mut mixed = run(p, &[1000, 1000]);
        mixed.extend(run(q, &[1000]));
        assert_eq!(group_len(&mixed), 2);
        // Empty datagrams never join a group.
        assert_eq!(group_len(&run(p, &[0, 0])), 1);
        assert_eq!(group_len(&run(p, &[10, 0])), 1);
        // At most 64 segments, and at most 65,000 bytes.
        assert_eq!(group_len(&run(p, &[100; 80])), 64);
        assert_eq!(group_len(&run(p, &[1432; 80])), 45);
        assert_eq!(group_len(&run(p, &[1000; 80])), 64);
        assert_eq!(group_len(&run(p, &[1300; 80])), 50);
        assert_eq!(group_len(&run(p, &[40_000, 40_000])), 1);
        assert_eq!(group_len(&[]), 0);
    }

    #[test]
    fn a_round_is_one_message_per_group() {
        let p: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let q: SocketAddr = "[::1]:2".parse().unwrap();
        let mut batch = run(p, &[1432; 50]);
        batch.extend(run(q, &[7]));
        batch.extend(run(p, &[900, 900, 10]));
        let mut state = SendState::new();
        assert_eq!(state.prepare(&batch, true), batch.len());
        assert_eq!(state.starts, [0, 45, 50, 51, 54]);
        assert_eq!(state.segments, [1432, 1432, 0, 900]);
        let iovs: Vec<usize> = state.msgs.iter().map(|m| m.msg_hdr.msg_iovlen).collect();
        assert_eq!(iovs, [45, 5, 1, 3]);
        let control: Vec<bool> = state.msgs.iter().map(|m| !m.msg_hdr.msg_control.is_null()).collect();
        assert_eq!(control, [true, true, false, true]);

        // Without GSO a round is one datagram per message, at most SEND_MSGS of them.
        assert_eq!(state.prepare(&batch, false), batch.len());
        assert!(state.segments.iter().all(|&s| s == 0));
        let long = run(p, &[100; 100]);
        assert_eq!(state.prepare(&long, false), SEND_MSGS);
        assert_eq!(state.iovs.len(), SEND_MSGS);
        assert_eq!(state.prepare(&long, true), 100);
        assert_eq!(state.segments, [100, 100]);
    }
}
