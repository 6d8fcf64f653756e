//! The send side: messages waiting for the window, and segments in flight until acknowledged.
//!
//! In-flight segments sit in a deque indexed by `sn - una`, so an ACK finds its segment in
//! O(1) and marks it instead of removing it from the middle; acknowledged segments leave from
//! the front as `una` advances. Unacknowledged segments that the peer skipped over (a later
//! one was acked) are also listed in `holes`: only they can collect fast-retransmit votes,
//! so counting them does not walk the whole window on every ACK.

use std::collections::VecDeque;
use std::io::{self, Write};

use super::congestion::FlushLoss;
use super::output::Packer;
use super::pool::BufferPool;
use super::segment::{Command, Header};
use super::timediff;

/// A segment is fast-retransmitted at most this often (ikcp's IKCP_FASTACK_LIMIT).
const FASTACK_LIMIT: u32 = 5;
/// This many transmissions of one segment declare the link dead (ikcp's IKCP_DEADLINK).
const DEAD_LINK: u32 = 20;
/// Backoff stops growing here so that `now + rto` stays comparable with `timediff`.
const MAX_SEGMENT_RTO: u32 = 1 << 30;

#[derive(Debug)]
struct Queued {
    frg: u8,
    data: Vec<u8>,
}

#[derive(Debug)]
struct InFlight {
    frg: u8,
    acked: bool,
    xmit: u32,
    ts: u32,
    resend_at: u32,
    rto: u32,
    fastack: u32,
    data: Vec<u8>,
}

/// What a flush writes into every segment header and how it times retransmissions.
#[derive(Debug, Clone, Copy)]
pub struct TxParams {
    pub conv: u32,
    pub now: u32,
    pub wnd: u16,
    pub rcv_nxt: u32,
    pub rx_rto: u32,
    pub nodelay: bool,
    /// Fast-retransmit after this many skipping ACKs; `u32::MAX` disables it.
    pub resend: u32,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct FlushReport {
    pub loss: FlushLoss,
    pub dead: bool,
}

enum Transmission {
    First,
    Timeout,
    Fast,
}

impl InFlight {
    fn fast_due(&self, resend: u32) -> bool {
        self.fastack >= resend && self.xmit <= FASTACK_LIMIT
    }

    /// Decides whether this flush (re)sends the segment, with ikcp's priorities and backoff.
    fn due(&mut self, p: &TxParams) -> Option<Transmission> {
        let kind = if self.xmit == 0 {
            self.rto = p.rx_rto;
            let slack = if p.nodelay { 0 } else { p.rx_rto >> 3 };
            self.resend_at = p.now.wrapping_add(self.rto).wrapping_add(slack);
            Transmission::First
        } else if timediff(p.now, self.resend_at) >= 0 {
            let step = if p.nodelay {
                self.rto / 2
            } else {
                self.rto.max(p.rx_rto)
            };
            self.rto = self.rto.saturating_add(step).min(MAX_SEGMENT_RTO);
            self.resend_at = p.now.wrapping_add(self.rto);
            Transmission::Timeout
        } else if self.fast_due(p.resend) {
            self.fastack = 0;
            self.resend_at = p.now.wrapping_add(self.rto);
            Transmission::Fast
        } else {
            return None;
        };
        self.xmit += 1;
        self.ts = p.now;
        Some(kind)
    }

    fn header(&self, sn: u32, p: &TxParams) -> Header {
        Header {
            conv: p.conv,
            cmd: Command::Push,
            frg: self.frg,
            wnd: p.wnd,
            ts: self.ts,
            sn,
            una: p.rcv_nxt,
            len: self.data.len() as u32,
        }
    }
}

#[derive(Debug, Default)]
pub struct SendBuffer {
    queue: VecDeque<Queued>,
    /// `flight[i]` carries sequence number `una + i`.
    flight: VecDeque<InFlight>,
    una: u32,
    unacked: usize,
    /// Ascending; may hold stale entries (acked or below `una`) until the next vote count.
    holes: Vec<u32>,
    /// Every sequence number below this was checked for `holes`.
    scanned_to: u32,
    /// No unacknowledged segment times out before this, so flushes until then skip the
    /// retransmission pass over the old segments.
    rto_floor: u32,
    /// Some segment in `holes` collected enough fast-retransmit votes.
    fast_due: bool,
}

impl SendBuffer {
    pub fn una(&self) -> u32 {
        self.una
    }

    /// Sequence numbers in flight, acknowledged or not: what the send window limits.
    pub fn span(&self) -> usize {
        self.flight.len()
    }

    /// Segments queued or in flight and not yet acknowledged.
    pub fn waiting(&self) -> usize {
        self.queue.len() + self.unacked
    }

    /// Segments queued and not yet sent.
    pub fn unsent(&self) -> usize {
        self.queue.len()
    }

    pub fn enqueue(&mut self, frg: u8, data: Vec<u8>) {
        self.queue.push_back(Queued { frg, data });
    }

    fn index_of(&self, sn: u32) -> Option<usize> {
        let index = sn.wrapping_sub(self.una) as usize;
        (index < self.flight.len()).then_some(index)
    }

    /// The peer has everything below `una`.
    pub fn ack_below(&mut self, una: u32, pool: &mut BufferPool) {
        let count = timediff(una, self.una);
        if count <= 0 {
            return;
        }
        for _ in 0..(count as usize).min(self.flight.len()) {
            self.retire_front(pool);
        }
        self.pop_acked(pool);
    }

    pub fn ack(&mut self, sn: u32, pool: &mut BufferPool) {
        let Some(index) = self.index_of(sn) else {
            return;
        };
        self.scan_holes_to(sn);
        let seg = &mut self.flight[index];
        if !seg.acked {
            seg.acked = true;
            self.unacked -= 1;
            pool.give_back(std::mem::take(&mut seg.data));
        }
        self.pop_acked(pool);
    }

    fn pop_acked(&mut self, pool: &mut BufferPool) {
        while self.flight.front().is_some_and(|seg| seg.acked) {
            self.retire_front(pool);
        }
        let below_una = self.holes.partition_point(|&sn| timediff(sn, self.una) < 0);
        self.holes.drain(..below_una);
        if timediff(self.scanned_to, self.una) < 0 {
            self.scanned_to = self.una;
        }
    }

    fn retire_front(&mut self, pool: &mut BufferPool) {
        if let Some(seg) = self.flight.pop_front() {
            if !seg.acked {
                self.unacked -= 1;
                pool.give_back(seg.data);
            }
            self.una = self.una.wrapping_add(1);
        }
    }

    /// The peer acknowledged `sn`, so it skipped the unacknowledged segments below it.
    fn scan_holes_to(&mut self, sn: u32) {
        while timediff(self.scanned_to, sn) < 0 {
            let index = self.scanned_to.wrapping_sub(self.una) as usize;
            if self.flight.get(index).is_some_and(|seg| !seg.acked) {
                self.holes.push(self.scanned_to);
            }
            self.scanned_to = self.scanned_to.wrapping_add(1);
        }
        if timediff(sn, self.scanned_to) >= 0 {
            self.scanned_to = sn.wrapping_add(1);
        }
    }

    /// One input datagram acknowledged up to `max_ack`, sent at `ts`: one vote for every
    /// unacknowledged segment below it that was sent no later (ikcp's conservative fastack).
    pub fn count_fastack(&mut self, max_ack: u32, ts: u32, resend: u32) {
        if self.index_of(max_ack).is_none() {
            return;
        }
        let (una, flight) = (self.una, &mut self.flight);
        let mut due = false;
        self.holes.retain(|&sn| {
            let Some(seg) = flight.get_mut(sn.wrapping_sub(una) as usize) else {
                return false;
            };
            if seg.acked {
                return false;
            }
            if timediff(max_ack, sn) > 0 && timediff(ts, seg.ts) >= 0 {
                seg.fastack += 1;
            }
            due |= seg.fast_due(resend);
            true
        });
        self.fast_due |= due;
    }

    /// Moves queued messages into flight while fewer than `window` sequence numbers are out;
    /// returns the index of the first new one.
    pub fn admit(&mut self, window: u16) -> usize {
        let first_new = self.flight.len();
        while self.flight.len() < window as usize {
            let Some(Queued { frg, data }) = self.queue.pop_front() else {
                break;
            };
            self.flight.push_back(InFlight {
                frg,
                acked: false,
                xmit: 0,
                ts: 0,
                resend_at: 0,
                rto: 0,
                fastack: 0,
                data,
            });
            self.unacked += 1;
        }
        first_new
    }

    /// Sends the new segments from `first_new` on and the due retransmissions. Only when some
    /// RTO may have expired does this walk the whole flight; fast retransmits come from `holes`.
    pub fn transmit<W: Write>(
        &mut self,
        first_new: usize,
        p: &TxParams,
        out: &mut Packer<'_, W>,
    ) -> io::Result<FlushReport> {
        let full = timediff(p.now, self.rto_floor) >= 0;
        let mut pass = Pass {
            report: FlushReport::default(),
            floor: if full { None } else { Some(self.rto_floor) },
            fast_due: false,
        };
        if let Err(e) = self.transmit_pass(&mut pass, full, first_new, p, out) {
            // The pass stopped half way: make the next flush look at everything again.
            self.rto_floor = p.now;
            return Err(e);
        }
        // Nothing in flight: a floor of `now` costs one pass over the next new segments only.
        self.rto_floor = pass.floor.unwrap_or(p.now);
        self.fast_due = pass.fast_due;
        Ok(pass.report)
    }

    fn transmit_pass<W: Write>(
        &mut self,
        pass: &mut Pass,
        full: bool,
        first_new: usize,
        p: &TxParams,
        out: &mut Packer<'_, W>,
    ) -> io::Result<()> {
        let una = self.una;
        let start = if full { 0 } else { first_new };
        if !full && self.fast_due {
            for &sn in &self.holes {
                if let Some(seg) = self.flight.get_mut(sn.wrapping_sub(una) as usize) {
                    pass.visit(seg, sn, p, out)?;
                }
            }
        }
        for (offset, seg) in self.flight.range_mut(start..).enumerate() {
            pass.visit(seg, una.wrapping_add((start + offset) as u32), p, out)?;
        }
        Ok(())
    }
}

/// What one transmission pass learned about the segments it visited.
struct Pass {
    report: FlushReport,
    /// The earliest retransmission time seen (and the old floor when the pass is partial).
    floor: Option<u32>,
    fast_due: bool,
}

impl Pass {
    fn visit<W: Write>(
        &mut self,
        seg: &mut InFlight,
        sn: u32,
        p: &TxParams,
        out: &mut Packer<'_, W>,
    ) -> io::Result<()> {
        if seg.acked {
            return Ok(());
        }
        if let Some(kind) = seg.due(p) {
            match kind {
                Transmission::First => {}
                Transmission::Timeout => self.report.loss.timed_out = true,
                Transmission::Fast => self.report.loss.fast_retransmits += 1,
            }
            out.push(&seg.header(sn, p), &seg.data)?;
            self.report.dead |= seg.xmit >= DEAD_LINK;
        }
        self.floor = Some(self.floor.map_or(seg.resend_at, |f| earliest(f, seg.resend_at)));
        self.fast_due |= seg.fast_due(p.resend);
        Ok(())
    }
}

fn earliest(a: u32, b: u32) -> u32 {
    if timediff(a, b) <= 0 { a } else { b }
}
