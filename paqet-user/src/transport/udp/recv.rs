//! Receiving. With UDP GRO the kernel hands over a run of datagrams from one peer as one
//! buffer (one socket queue entry, one copy-out, one recvmmsg slot); they are split back
//! into datagrams here, and those the caller's batch has no room for wait for its next
//! call. Without GRO, datagrams go straight into the batch's slots.

use std::io;
use std::net::SocketAddr;
use std::ops::Range;

use super::sys::{self, CmsgBuf, RawAddr};
use crate::transport::{RecvBatch, RecvSlot};

/// Messages per `recvmmsg` call with GRO (the batch's free slots, if fewer).
const RECV_MSGS: usize = 64;
/// Room for one coalesced message: GRO stops at 64 KiB. Only the pages the kernel writes
/// are ever touched, so the 4 MiB of buffers cost little memory when nothing coalesces.
const GRO_BUF: usize = 1 << 16;

/// A received message that still holds datagrams for the caller.
#[derive(Clone, Copy)]
struct Held {
    peer: SocketAddr,
    /// Where it lies in `RecvState::bufs`.
    base: usize,
    len: usize,
    /// Length of each datagram but the last, which may be shorter; `len` when the kernel
    /// did not coalesce.
    segment: usize,
}

/// Reused receive state: message headers, and with GRO the 64 KiB buffers and the
/// datagrams in them not yet handed out.
pub(super) struct RecvState {
    /// Whether the socket accepted UDP_GRO.
    gro: bool,
    bufs: Vec<u8>,
    addrs: Vec<RawAddr>,
    cmsgs: Vec<CmsgBuf>,
    iovs: Vec<libc::iovec>,
    msgs: Vec<libc::mmsghdr>,
    held: Vec<Held>,
    /// The next datagram to hand out: message `next` of `held`, at `offset` in it.
    next: usize,
    offset: usize,
    /// Messages that arrived coalesced, so tests can tell GRO happened.
    #[cfg(test)]
    pub(super) coalesced: usize,
}

// SAFETY: the raw pointers in `msgs` and `iovs` are rewritten before every system call
// and only dereferenced by the kernel during it; between calls nothing reads them, so the
// state may move to another thread with its Mutex.
unsafe impl Send for RecvState {}

impl RecvState {
    pub(super) fn new(gro: bool) -> RecvState {
        RecvState {
            gro,
            bufs: if gro { vec![0; RECV_MSGS * GRO_BUF] } else { Vec::new() },
            addrs: vec![RawAddr::zeroed(); RECV_MSGS],
            cmsgs: vec![CmsgBuf::ZERO; RECV_MSGS],
            iovs: Vec::with_capacity(RECV_MSGS),
            msgs: Vec::with_capacity(RECV_MSGS),
            held: Vec::with_capacity(RECV_MSGS),
            next: 0,
            offset: 0,
            #[cfg(test)]
            coalesced: 0,
        }
    }

    /// Whether datagrams already received wait here for the caller.
    pub(super) fn has_pending(&self) -> bool {
        self.next < self.held.len()
    }

    /// Fills `batch` with waiting datagrams, then with what the socket holds, without
    /// waiting; how many.
    pub(super) fn fill(&mut self, fd: i32, batch: &mut RecvBatch) -> io::Result<usize> {
        let filled = if self.gro {
            self.fill_coalesced(fd, batch)?
        } else {
            self.recv_direct(fd, batch.slots_mut())?
        };
        batch.set_filled(filled);
        Ok(filled)
    }

    fn fill_coalesced(&mut self, fd: i32, batch: &mut RecvBatch) -> io::Result<usize> {
        let capacity = batch.capacity();
        let mut filled = self.hand_out(batch.slots_mut(), 0);
        if filled < capacity {
            match self.recv_coalesced(fd, capacity - filled) {
                Ok(()) => filled = self.hand_out(batch.slots_mut(), filled),
                // What was waiting goes out now; an error that lasts shows again next call.
                Err(_) if filled > 0 => {}
                Err(e) => return Err(e),
            }
        }
        Ok(filled)
    }

    /// Receives up to `want` messages into the GRO buffers. Everything held must have
    /// been handed out: the buffers are overwritten.
    fn recv_coalesced(&mut self, fd: i32, want: usize) -> io::Result<()> {
        debug_assert!(!self.has_pending());
        self.held.clear();
        self.next = 0;
        self.offset = 0;
        let n = want.clamp(1, RECV_MSGS);
        self.iovs.clear();
        self.iovs
            .extend(self.bufs.chunks_exact_mut(GRO_BUF).take(n).map(|buf| libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            }));
        self.msgs.clear();
        for ((addr, iov), cmsg) in self.addrs.iter_mut().zip(&mut self.iovs).zip(&mut self.cmsgs) {
            let namelen = size_of::<RawAddr>() as libc::socklen_t;
            self.msgs.push(sys::message(addr, namelen, iov, 1, Some(cmsg)));
        }
        let got = sys::recvmmsg(fd, &mut self.msgs)?;
        for (i, msg) in self.msgs[..got].iter().enumerate() {
            let Some(peer) = sys::from_raw(&self.addrs[i]) else {
                continue;
            };
            let mut len = msg.msg_len as usize;
            let segment = sys::gro_segment_size(msg).filter(|&s| s < len);
            if msg.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
                // Only a coalesced message outgrows 64 KiB; its whole segments are intact.
                let Some(segment) = segment else { continue };
                len -= len % segment;
            }
            #[cfg(test)]
            if segment.is_some() {
                self.coalesced += 1;
            }
            let base = i * GRO_BUF;
            let segment = segment.unwrap_or(len);
            self.held.push(Held {
                peer,
                base,
                len,
                segment,
            });
        }
        Ok(())
    }

    /// The next datagram held, as its peer and its bytes' place in `bufs`.
    fn next_datagram(&mut self) -> Option<(SocketAddr, Range<usize>)> {
        let msg = *self.held.get(self.next)?;
        let start = self.offset;
        // `segment` is 0 only for an empty datagram, whose range is empty.
        let end = msg.len.min(start + msg.segment);
        if end >= msg.len {
            self.next += 1;
            self.offset = 0;
        } else {
            self.offset = end;
        }
        Some((msg.peer, msg.base + start..msg.base + end))
    }

    /// Copies held datagrams into `slots[filled..]`; the new count of filled slots.
    fn hand_out(&mut self, slots: &mut [RecvSlot], mut filled: usize) -> usize {
        while filled < slots.len() {
            let Some((peer, range)) = self.next_datagram() else {
                break;
            };
            let datagram = &self.bufs[range];
            let slot = &mut slots[filled];
            // Longer than any datagram paqet sends, so not paqet's: dropped.
            let Some(dst) = slot.buf.get_mut(..datagram.len()) else {
                continue;
            };
            dst.copy_from_slice(datagram);
            slot.len = datagram.len();
            slot.peer = peer;
            filled += 1;
        }
        filled
    }

    /// Receives straight into the slots, for a socket without GRO; how many it filled.
    fn recv_direct(&mut self, fd: i32, slots: &mut [RecvSlot]) -> io::Result<usize> {
        if self.addrs.len() < slots.len() {
            // Only a batch larger than any before grows this (once).
            self.addrs.resize(slots.len(), RawAddr::zeroed());
        }
        self.iovs.clear();
        self.iovs.extend(slots.iter_mut().map(|s| libc::iovec {
            iov_base: s.buf.as_mut_ptr().cast(),
            iov_len: s.buf.len(),
        }));
        self.msgs.clear();
        for (addr, iov) in self.addrs.iter_mut().zip(&mut self.iovs) {
            let namelen = size_of::<RawAddr>() as libc::socklen_t;
            self.msgs.push(sys::message(addr, namelen, iov, 1, None));
        }
        let got = sys::recvmmsg(fd, &mut self.msgs)?;
        let mut filled = 0;
        for i in 0..got {
            let Some(peer) = sys::from_raw(&self.addrs[i]) else {
                continue;
            };
            let msg = &self.msgs[i];
            // Cut short by the slot: longer than any datagram paqet sends, so not paqet's.
            if msg.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
                continue;
            }
            if filled != i {
                slots.swap(filled, i);
            }
            slots[filled].len = msg.msg_len as usize;
            slots[filled].peer = peer;
            filled += 1;
        }
        Ok(filled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Puts `bytes` into GRO buffer `i` as a message from `peer` cut every `segment` bytes.
    fn hold(state: &mut RecvState, i: usize, peer: SocketAddr, bytes: &[u8], segment: usize) {
        let base = i * GRO_BUF;
        state.bufs[base..base + bytes.len()].copy_from_slice(bytes);
        state.held.push(Held {
            peer,
            base,
            len: bytes.len(),
            segment,
        });
    }

    fn take(state: &mut RecvState, batch: &mut RecvBatch) -> Vec<(SocketAddr, Vec<u8>)> {
        let n = state.hand_out(batch.slots_mut(), 0);
        batch.set_filled(n);
        batch.iter().map(|(peer, bytes)| (peer, bytes.to_vec())).collect()
    }

    #[test]
    fn coalesced_buffers_split_into_their_datagrams() {
        let p: SocketAddr = "192.0.2.1:1000".parse().unwrap();
        let q: SocketAddr = "[2001:db8::1]:2000".parse().unwrap();
        let mut state = RecvState::new(true);
        let run: Vec<u8> = (0..237u8).collect();
        hold(&mut state, 0, p, &run, 100);
        hold(&mut state, 1, q, b"single", 6);
        hold(&mut state, 2, p, &[7; 3000], 3000);
        hold(&mut state, 3, q, &[], 0);
        hold(&mut state, 4, p, &[1, 2, 3, 4, 5, 6, 7, 8], 4);

        // Two slots at a time: the rest stays pending, in order, across calls.
        let mut batch = RecvBatch::new(2, 2048);
        assert_eq!(
            take(&mut state, &mut batch),
            [(p, run[..100].to_vec()), (p, run[100..200].to_vec())]
        );
        assert!(state.has_pending());
        assert_eq!(
            take(&mut state, &mut batch),
            [(p, run[200..].to_vec()), (q, b"single".to_vec())]
        );
        // The 3000-byte datagram does not fit a slot and is dropped.
        assert_eq!(take(&mut state, &mut batch), [(q, vec![]), (p, vec![1, 2, 3, 4])]);
        assert_eq!(take(&mut state, &mut batch), [(p, vec![5, 6, 7, 8])]);
        assert!(!state.has_pending());
        assert_eq!(take(&mut state, &mut batch), []);
    }
}
