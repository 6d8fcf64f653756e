//! Our KCP: a reliable, ordered, message-preserving ARQ over datagrams, wire-compatible
//! with ikcp (and the `kcp` crate) in message mode.
//!
//! Sans-IO like the rest of the engine: time comes in as `current` milliseconds, received
//! datagrams through [`Arq::input`], and packets leave through the `W: Write` the caller
//! hands to [`Arq::flush`] and [`Arq::update`], one `write` per packet of at most one MTU.
//! The conversation holds no handle to anything outside itself.
//!
//! It keeps ikcp's protocol and timing (RTO estimate and backoff, fast retransmit, window
//! probes, the optional congestion window) but not its lists: in-flight segments are found
//! by sequence number in O(1), out-of-order segments land in a ring in O(1), and payload
//! buffers are reused. With 16384-segment windows and 1 % loss, ikcp's linear searches and
//! middle removals were half of a relay's CPU.
//!
//! Deviations from ikcp: only message mode; a datagram is checked whole before any of it is
//! applied, and a trailing partial header is an error rather than ignored; a message may have
//! up to 255 fragments when the receive window allows (ikcp stops at 127); a segment's
//! backed-off RTO stops growing at 2^30 ms; `flush` works before the first `update`.

mod congestion;
mod error;
mod output;
mod pool;
mod probe;
mod recv;
mod rto;
mod segment;
mod send;
#[cfg(test)]
mod tests;

use std::fmt;
use std::io::{self, Write};

pub use error::ArqError;

use congestion::Congestion;
use output::Packer;
use pool::BufferPool;
use probe::WindowProbe;
use recv::RecvBuffer;
use rto::{RTO_MIN_NODELAY, RTO_MIN_NORMAL, RttEstimator};
use segment::{Command, HEADER_LEN, Header, Segments};
use send::{SendBuffer, TxParams};

/// ikcp's defaults.
const WND_SND: u16 = 32;
/// Also the smallest receive window by default: a message of up to 127 fragments (ikcp's
/// most) must always fit. A user whose messages are smaller may lower it
/// ([`Arq::set_min_rcv_wnd`]).
const WND_RCV: u16 = 128;
const MTU_DEFAULT: usize = 1400;
const MTU_MIN: usize = 50;
const INTERVAL_DEFAULT: u32 = 100;
const INTERVAL_MIN: i32 = 10;
const INTERVAL_MAX: i32 = 5000;
/// `frg` is one byte.
const MAX_FRAGMENTS: usize = 255;
/// A clock jump larger than this restarts the flush schedule rather than catching up.
const MAX_CLOCK_SLIP: i32 = 10_000;

/// Signed distance between two wrapping timestamps or sequence numbers.
fn timediff(later: u32, earlier: u32) -> i32 {
    later.wrapping_sub(earlier) as i32
}

/// The conversation id of a datagram (its first four bytes), 0 when it is shorter.
pub fn get_conv(data: &[u8]) -> u32 {
    data.first_chunk::<4>().map_or(0, |b| u32::from_le_bytes(*b))
}

/// Whether a datagram carries the first segment of a conversation (a PUSH with sn 0):
/// what a new stream starts with, and what a conversation the receiver lost (after a
/// restart) never carries again.
pub fn opens_conversation(data: &[u8]) -> bool {
    Segments::new(data)
        .map_while(Result::ok)
        .any(|(h, _)| h.cmd == Command::Push && h.sn == 0)
}

pub struct Arq {
    conv: u32,
    mss: usize,
    current: u32,
    interval: u32,
    next_flush: u32,
    updated: bool,
    nodelay: bool,
    no_cwnd: bool,
    /// Fast-retransmit after this many skipping ACKs; 0 disables it.
    resend: u32,
    snd_wnd: u16,
    rcv_wnd: u16,
    /// The receive window never goes below this.
    min_rcv_wnd: u16,
    /// The highest `rcv_nxt + rcv_wnd` while the window was larger: what the peer may
    /// still send after the engine shrank the window (see `set_wndsize`).
    accept_until: u32,
    /// The free window the peer advertised last.
    rmt_wnd: u16,
    dead: bool,
    rtt: RttEstimator,
    cc: Congestion,
    probe: WindowProbe,
    send: SendBuffer,
    recv: RecvBuffer,
    /// (sn, ts) of received segments, acknowledged on the next flush.
    acks: Vec<(u32, u32)>,
    pool: BufferPool,
    mtu: usize,
    /// The packet being packed, kept between flushes for its capacity.
    packet: Vec<u8>,
}

impl fmt::Debug for Arq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Arq")
            .field("conv", &self.conv)
            .field("snd_una", &self.send.una())
            .field("rcv_nxt", &self.recv.next_sn())
            .field("wait_snd", &self.send.waiting())
            .field("rmt_wnd", &self.rmt_wnd)
            .field("rto", &self.rtt.rto())
            .field("dead", &self.dead)
            .finish_non_exhaustive()
    }
}

impl Arq {
    pub fn new(conv: u32) -> Self {
        let mut pool = BufferPool::default();
        pool.set_capacity(MTU_DEFAULT - HEADER_LEN);
        Arq {
            conv,
            mss: MTU_DEFAULT - HEADER_LEN,
            current: 0,
            interval: INTERVAL_DEFAULT,
            next_flush: INTERVAL_DEFAULT,
            updated: false,
            nodelay: false,
            no_cwnd: false,
            resend: 0,
            snd_wnd: WND_SND,
            rcv_wnd: WND_RCV,
            min_rcv_wnd: WND_RCV,
            accept_until: WND_RCV as u32,
            rmt_wnd: WND_RCV,
            dead: false,
            rtt: RttEstimator::default(),
            cc: Congestion::default(),
            probe: WindowProbe::default(),
            send: SendBuffer::default(),
            recv: RecvBuffer::default(),
            acks: Vec::new(),
            pool,
            mtu: MTU_DEFAULT,
            packet: Vec::with_capacity(MTU_DEFAULT),
        }
    }

    /// kcptun's fast3 is `(true, 10, 2, true)`. `resend` below 0 keeps the current setting.
    pub fn set_nodelay(&mut self, nodelay: bool, interval: i32, resend: i32, nc: bool) {
        self.nodelay = nodelay;
        self.rtt.min_rto = if nodelay { RTO_MIN_NODELAY } else { RTO_MIN_NORMAL };
        self.interval = interval.clamp(INTERVAL_MIN, INTERVAL_MAX) as u32;
        if let Ok(resend) = u32::try_from(resend) {
            self.resend = resend;
        }
        self.no_cwnd = nc;
    }

    pub fn set_mtu(&mut self, mtu: usize) -> Result<(), ArqError> {
        if mtu < MTU_MIN || mtu <= HEADER_LEN {
            return Err(ArqError::InvalidMtu(mtu));
        }
        self.mtu = mtu;
        self.mss = mtu - HEADER_LEN;
        self.pool.set_capacity(self.mss);
        Ok(())
    }

    /// Zero leaves a window unchanged; the receive window is at least 128 like ikcp's.
    ///
    /// The engine resizes windows while streams run, which plain ikcp never expects:
    /// - shrinking, segments the peer sent within the old window are still taken (dropped,
    ///   they would only come back after a backed-off RTO, and a paused reader's stream
    ///   could even be declared dead);
    /// - growing a window we had advertised as full, the peer is told at the next flush
    ///   (it would otherwise wait for its 7 s window probe).
    pub fn set_wndsize(&mut self, snd: u16, rcv: u16) {
        if snd > 0 {
            self.snd_wnd = snd;
        }
        if rcv == 0 {
            return;
        }
        let rcv = rcv.max(self.min_rcv_wnd);
        let edge = self.recv.next_sn().wrapping_add(self.rcv_wnd as u32);
        if timediff(edge, self.accept_until) > 0 {
            self.accept_until = edge;
        }
        if rcv > self.rcv_wnd && self.recv.unused_window(self.rcv_wnd) == 0 {
            self.probe.tell = true;
        }
        self.rcv_wnd = rcv;
    }

    /// Lowers (or raises) the smallest receive window `set_wndsize` allows, for a user
    /// whose messages have at most `min - 1` fragments. Applies from the next resize.
    pub fn set_min_rcv_wnd(&mut self, min: u16) {
        self.min_rcv_wnd = min.max(2);
    }

    pub fn snd_wnd(&self) -> u16 {
        self.snd_wnd
    }

    /// Segments queued or in flight and not yet acknowledged.
    pub fn wait_snd(&self) -> usize {
        self.send.waiting()
    }

    /// Receive-side slots and segments held: bounded by the windows, whatever the peer
    /// sends.
    pub fn recv_held(&self) -> usize {
        self.recv.held()
    }

    /// Segments queued and not yet sent.
    pub fn unsent(&self) -> usize {
        self.send.unsent()
    }

    /// ACKs the next flush sends, when that is all it would do and they acknowledge
    /// in-order data. `None` while anything of ours waits (a queued or unacknowledged
    /// segment may be due for a fast retransmit), a window probe is wanted, or data came
    /// past a hole: the sender counts ACKs past a hole to retransmit it, so those go out
    /// at once, as TCP sends its out-of-order ACKs.
    pub fn only_acks_owed(&self) -> Option<usize> {
        let ours_idle = self.send.waiting() == 0 && !self.probe.ask && !self.probe.tell;
        let next = self.recv.next_sn();
        let in_order = self.acks.iter().all(|&(sn, _)| timediff(sn, next) < 0);
        (ours_idle && in_order).then_some(self.acks.len())
    }

    /// Some segment was sent 20 times without being acknowledged.
    pub fn is_dead_link(&self) -> bool {
        self.dead
    }

    /// Queues one message, split into MSS-sized fragments; returns its length.
    pub fn send(&mut self, buf: &[u8]) -> Result<usize, ArqError> {
        self.send_joined(&[], buf)
    }

    /// Queues one message made of `head` followed by `body`, each byte copied once,
    /// straight into its segment.
    pub fn send_joined(&mut self, head: &[u8], body: &[u8]) -> Result<usize, ArqError> {
        let len = head.len() + body.len();
        let fragments = len.div_ceil(self.mss).max(1);
        // The peer can only reassemble a message that fits its receive queue.
        if fragments > MAX_FRAGMENTS || fragments >= self.rcv_wnd as usize {
            return Err(ArqError::MessageTooBig { fragments });
        }
        for i in 0..fragments {
            let start = i * self.mss;
            let end = (start + self.mss).min(len);
            let data = self.pool.copy_of_joined(head, body, start..end);
            self.send.enqueue((fragments - 1 - i) as u8, data);
        }
        Ok(len)
    }

    /// Size of the next whole message.
    pub fn peeksize(&self) -> Result<usize, ArqError> {
        self.recv.peek_size()
    }

    /// Copies the next whole message into `buf`.
    pub fn recv(&mut self, buf: &mut [u8]) -> Result<usize, ArqError> {
        let (size, reopened) = self.recv.recv(buf, self.rcv_wnd, &mut self.pool)?;
        if reopened {
            self.probe.tell = true;
        }
        Ok(size)
    }

    /// Takes one datagram of one or more segments. A datagram with any malformed segment or
    /// a foreign conversation id is rejected whole, before any of it takes effect.
    pub fn input(&mut self, data: &[u8]) -> Result<usize, ArqError> {
        self.check_datagram(data)?;
        let old_una = self.send.una();
        let mut newest_ack = None;
        for (header, payload) in Segments::new(data).map_while(Result::ok) {
            self.rmt_wnd = header.wnd;
            self.send.ack_below(header.una, &mut self.pool);
            match header.cmd {
                Command::Ack => {
                    self.on_ack(&header);
                    newest_ack = Some(newer_ack(newest_ack, &header));
                }
                Command::Push => self.on_push(&header, payload),
                Command::WindowAsk => self.probe.tell = true,
                Command::WindowTell => {}
            }
        }
        if let Some((sn, ts)) = newest_ack {
            self.send.count_fastack(sn, ts, self.resend_threshold());
        }
        if timediff(self.send.una(), old_una) > 0 {
            self.cc.on_progress(self.rmt_wnd, self.mss);
        }
        Ok(data.len())
    }

    fn check_datagram(&self, data: &[u8]) -> Result<(), ArqError> {
        if data.len() < HEADER_LEN {
            return Err(ArqError::TruncatedHeader(data.len()));
        }
        for segment in Segments::new(data) {
            let (header, _) = segment?;
            if header.conv != self.conv {
                return Err(ArqError::ConvMismatch {
                    expected: self.conv,
                    found: header.conv,
                });
            }
        }
        Ok(())
    }

    fn on_ack(&mut self, header: &Header) {
        let rtt = timediff(self.current, header.ts);
        if rtt >= 0 {
            self.rtt.sample(rtt as u32, self.interval);
        }
        self.send.ack(header.sn, &mut self.pool);
    }

    fn on_push(&mut self, header: &Header, payload: &[u8]) {
        let rcv_nxt = self.recv.next_sn();
        let ahead = header.sn.wrapping_sub(rcv_nxt);
        let duplicate = (ahead as i32) < 0;
        if !duplicate && ahead >= self.acceptable_ahead() {
            return;
        }
        // Duplicates below rcv_nxt are acknowledged again: the first ACK may have been lost.
        self.acks.push((header.sn, header.ts));
        if !duplicate {
            self.recv
                .insert(header.sn, header.frg, payload, self.rcv_wnd, &mut self.pool);
        }
    }

    /// How far past `rcv_nxt` a segment may lie: the window, or the edge an earlier,
    /// larger window let the peer send to. Measured from `rcv_nxt` as an unsigned
    /// distance, so a stale `accept_until` (one `rcv_nxt` has passed) allows nothing
    /// extra: compared as wrapping signed numbers instead, a segment about 2^31 ahead
    /// passed the check and the receive ring grew to that many slots.
    fn acceptable_ahead(&self) -> u32 {
        let window = u32::from(self.rcv_wnd);
        let earlier = self.accept_until.wrapping_sub(self.recv.next_sn());
        if earlier <= u32::from(u16::MAX) {
            window.max(earlier)
        } else {
            window
        }
    }

    fn resend_threshold(&self) -> u32 {
        if self.resend > 0 { self.resend } else { u32::MAX }
    }

    /// Advances the clock and flushes into `sink` when the interval elapsed.
    pub fn update<W: Write>(&mut self, current: u32, sink: &mut W) -> Result<(), ArqError> {
        self.current = current;
        if !self.updated {
            self.updated = true;
            self.next_flush = current;
        }
        let mut slip = timediff(current, self.next_flush);
        if !(-MAX_CLOCK_SLIP..MAX_CLOCK_SLIP).contains(&slip) {
            self.next_flush = current;
            slip = 0;
        }
        if slip < 0 {
            return Ok(());
        }
        self.next_flush = self.next_flush.wrapping_add(self.interval);
        if timediff(current, self.next_flush) >= 0 {
            self.next_flush = current.wrapping_add(self.interval);
        }
        self.flush(sink)?;
        if self.send.waiting() == 0 && self.recv.is_empty() {
            self.pool.release();
        }
        Ok(())
    }

    /// Writes into `sink` pending ACKs and window probes, new segments the windows allow,
    /// and due retransmissions.
    pub fn flush<W: Write>(&mut self, sink: &mut W) -> Result<(), ArqError> {
        let mut out = Packer::new(std::mem::take(&mut self.packet), self.mtu, sink);
        let flushed = self.flush_into(&mut out);
        self.packet = out.into_buffer();
        flushed
    }

    fn flush_into<W: Write>(&mut self, out: &mut Packer<'_, W>) -> Result<(), ArqError> {
        let wnd = self.recv.unused_window(self.rcv_wnd);
        let una = self.recv.next_sn();
        self.flush_acks(wnd, una, out)?;
        self.probe.schedule(self.rmt_wnd, self.current);
        self.flush_probes(wnd, una, out)?;
        let window = self.send_window();
        let first_new = self.send.admit(window);
        let params = TxParams {
            conv: self.conv,
            now: self.current,
            wnd,
            rcv_nxt: una,
            rx_rto: self.rtt.rto(),
            nodelay: self.nodelay,
            resend: self.resend_threshold(),
        };
        let report = self.send.transmit(first_new, &params, out)?;
        out.finish()?;
        self.dead |= report.dead;
        let in_flight = self.send.span() as u32;
        self.cc
            .on_flush(report.loss, in_flight, window, params.resend, self.mss);
        Ok(())
    }

    fn control(&self, cmd: Command, wnd: u16, una: u32) -> Header {
        Header {
            conv: self.conv,
            cmd,
            frg: 0,
            wnd,
            ts: 0,
            sn: 0,
            una,
            len: 0,
        }
    }

    fn flush_acks<W: Write>(&mut self, wnd: u16, una: u32, out: &mut Packer<'_, W>) -> io::Result<()> {
        let base = self.control(Command::Ack, wnd, una);
        for &(sn, ts) in &self.acks {
            out.push(&Header { sn, ts, ..base }, &[])?;
        }
        self.acks.clear();
        Ok(())
    }

    fn flush_probes<W: Write>(&mut self, wnd: u16, una: u32, out: &mut Packer<'_, W>) -> io::Result<()> {
        let wanted = [
            (self.probe.ask, Command::WindowAsk),
            (self.probe.tell, Command::WindowTell),
        ];
        for (_, cmd) in wanted.into_iter().filter(|(wanted, _)| *wanted) {
            let header = self.control(cmd, wnd, una);
            out.push(&header, &[])?;
        }
        self.probe.ask = false;
        self.probe.tell = false;
        Ok(())
    }

    /// Sequence numbers that may be in flight: ours, the peer's free window and, unless
    /// disabled, the congestion window.
    fn send_window(&self) -> u16 {
        let window = self.snd_wnd.min(self.rmt_wnd);
        if self.no_cwnd { window } else { window.min(self.cc.cwnd) }
    }
}

/// Among a datagram's ACKs, the one fast retransmit counts from: the highest sequence number,
/// taken only if also sent later (ikcp's conservative choice).
fn newer_ack(current: Option<(u32, u32)>, header: &Header) -> (u32, u32) {
    match current {
        Some((sn, ts)) if timediff(header.sn, sn) <= 0 || timediff(header.ts, ts) <= 0 => (sn, ts),
        _ => (header.sn, header.ts),
    }
}
