//! The receive side: out-of-order segments wait in a ring indexed by `sn - rcv_nxt` (O(1)
//! insert and duplicate check), and move in order to the queue that `recv` reads whole
//! messages from.

use std::collections::VecDeque;

use super::ArqError;
use super::pool::BufferPool;

#[derive(Debug)]
struct Fragment {
    /// Fragments of the same message after this one.
    frg: u8,
    data: Vec<u8>,
}

#[derive(Debug, Default)]
pub struct RecvBuffer {
    /// The next sequence number to move to the queue.
    nxt: u32,
    /// `ring[i]` holds sequence number `nxt + i` once it arrived.
    ring: VecDeque<Option<Fragment>>,
    queue: VecDeque<Fragment>,
}

impl RecvBuffer {
    pub fn next_sn(&self) -> u32 {
        self.nxt
    }

    /// Free room in the queue: what we advertise to the peer.
    pub fn unused_window(&self, rcv_wnd: u16) -> u16 {
        rcv_wnd.saturating_sub(self.queue.len().min(u16::MAX as usize) as u16)
    }

    /// Slots held in the ring and segments in the queue: what the peer makes us keep.
    pub fn held(&self) -> usize {
        self.ring.len() + self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty() && self.ring.is_empty()
    }

    /// Stores segment `sn`, which the caller checked lies in `[nxt, nxt + rcv_wnd)`;
    /// a duplicate is dropped without copying.
    pub fn insert(&mut self, sn: u32, frg: u8, payload: &[u8], rcv_wnd: u16, pool: &mut BufferPool) {
        let index = sn.wrapping_sub(self.nxt) as usize;
        if index >= self.ring.len() {
            self.ring.resize_with(index + 1, || None);
        }
        let slot = &mut self.ring[index];
        if slot.is_none() {
            *slot = Some(Fragment {
                frg,
                data: pool.copy_of(payload),
            });
        }
        self.deliver(rcv_wnd);
    }

    /// Moves in-order segments to the queue while it has room.
    fn deliver(&mut self, rcv_wnd: u16) {
        while self.queue.len() < rcv_wnd as usize {
            let Some(fragment) = self.ring.front_mut().and_then(Option::take) else {
                break;
            };
            self.ring.pop_front();
            self.queue.push_back(fragment);
            self.nxt = self.nxt.wrapping_add(1);
        }
    }

    /// Fragments of the next message: up to the one with `frg == 0` (or, from a peer that
    /// miscounts, the whole queue, as ikcp does).
    fn message_fragments(&self) -> usize {
        self.queue
            .iter()
            .position(|f| f.frg == 0)
            .map_or(self.queue.len(), |last| last + 1)
    }

    pub fn peek_size(&self) -> Result<usize, ArqError> {
        let first = self.queue.front().ok_or(ArqError::RecvQueueEmpty)?;
        if self.queue.len() <= first.frg as usize {
            return Err(ArqError::ExpectingFragment);
        }
        let count = self.message_fragments();
        Ok(self.queue.iter().take(count).map(|f| f.data.len()).sum())
    }

    /// Copies the next whole message into `buf`; also tells whether this reopened a full
    /// queue, which the peer must hear about since it stopped sending.
    pub fn recv(&mut self, buf: &mut [u8], rcv_wnd: u16, pool: &mut BufferPool) -> Result<(usize, bool), ArqError> {
        let size = self.peek_size()?;
        if size > buf.len() {
            return Err(ArqError::BufferTooSmall {
                need: size,
                have: buf.len(),
            });
        }
        let was_full = self.queue.len() >= rcv_wnd as usize;
        let mut at = 0;
        let count = self.message_fragments();
        for fragment in self.queue.drain(..count) {
            buf[at..at + fragment.data.len()].copy_from_slice(&fragment.data);
            at += fragment.data.len();
            pool.give_back(fragment.data);
        }
        self.deliver(rcv_wnd);
        Ok((size, was_full && self.queue.len() < rcv_wnd as usize))
    }
}
