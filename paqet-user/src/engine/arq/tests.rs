//! Conversations over an in-memory link: clean, lossy, against the `kcp` crate, and under
//! hostile input.

use std::cell::RefCell;
use std::io::{self, Write};
use std::rc::Rc;

use super::segment::{Command, Header, Segments};
use super::*;

const MTU: usize = 1400;
const MSS: usize = MTU - HEADER_LEN;

/// Where an endpoint writes its packets, for the test to carry.
#[derive(Clone, Default)]
struct Wire(Rc<RefCell<Vec<Vec<u8>>>>);

impl Write for Wire {
    fn write(&mut self, packet: &[u8]) -> io::Result<usize> {
        self.0.borrow_mut().push(packet.to_vec());
        Ok(packet.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Wire {
    fn take(&self) -> Vec<Vec<u8>> {
        std::mem::take(&mut *self.0.borrow_mut())
    }
}

/// An `Arq` wired to a `Wire`: its `flush` and `update` write there, as the kcp crate's
/// conversation writes to the writer it owns, so one link simulation drives both.
struct Wired {
    arq: Arq,
    wire: Wire,
}

impl Wired {
    fn flush(&mut self) -> Result<(), ArqError> {
        self.arq.flush(&mut self.wire)
    }

    fn update(&mut self, now: u32) -> Result<(), ArqError> {
        self.arq.update(now, &mut self.wire)
    }
}

impl std::ops::Deref for Wired {
    type Target = Arq;
    fn deref(&self) -> &Arq {
        &self.arq
    }
}

impl std::ops::DerefMut for Wired {
    fn deref_mut(&mut self) -> &mut Arq {
        &mut self.arq
    }
}

/// xorshift64*: deterministic, dependency-free.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn percent(&mut self, p: u64) -> bool {
        self.below(100) < p
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }

    fn bytes_below(&mut self, max_len: u64) -> Vec<u8> {
        let len = self.below(max_len) as usize;
        self.bytes(len)
    }
}

/// What the link simulation needs from either implementation.
trait Endpoint {
    fn send_msg(&mut self, msg: &[u8]) -> bool;
    fn recv_msg(&mut self, buf: &mut [u8]) -> Option<usize>;
    fn input_packet(&mut self, packet: &[u8]);
    fn tick(&mut self, now: u32);
    fn flush_now(&mut self);
    fn pending(&self) -> usize;
}

/// The two implementations share method names but no trait of their own.
macro_rules! endpoint {
    ($($t:ty),*) => {$(
        impl Endpoint for $t {
            fn send_msg(&mut self, msg: &[u8]) -> bool {
                self.send(msg).is_ok()
            }
            fn recv_msg(&mut self, buf: &mut [u8]) -> Option<usize> {
                self.recv(buf).ok()
            }
            fn input_packet(&mut self, packet: &[u8]) {
                self.input(packet).unwrap();
            }
            fn tick(&mut self, now: u32) {
                self.update(now).unwrap();
            }
            fn flush_now(&mut self) {
                self.flush().unwrap();
            }
            fn pending(&self) -> usize {
                self.wait_snd()
            }
        }
    )*};
}

endpoint!(Wired, kcp::Kcp<Wire>);

/// kcptun's fast3 with a window large enough for 200 kB messages.
fn arq(conv: u32) -> (Wired, Wire) {
    let wire = Wire::default();
    let mut a = Wired {
        arq: Arq::new(conv),
        wire: wire.clone(),
    };
    a.set_nodelay(true, 10, 2, true);
    a.set_mtu(MTU).unwrap();
    a.set_wndsize(256, 256);
    (a, wire)
}

fn ikcp(conv: u32) -> (kcp::Kcp<Wire>, Wire) {
    let wire = Wire::default();
    let mut k = kcp::Kcp::new(conv, wire.clone());
    k.set_nodelay(true, 10, 2, true);
    k.set_mtu(MTU).unwrap();
    k.set_wndsize(256, 256);
    k.update(0).unwrap();
    (k, wire)
}

#[derive(Clone, Copy)]
struct LinkConfig {
    delay_ms: u32,
    jitter_ms: u32,
    loss_pct: u64,
    dup_pct: u64,
}

const CLEAN: LinkConfig = LinkConfig {
    delay_ms: 20,
    jitter_ms: 0,
    loss_pct: 0,
    dup_pct: 0,
};

/// Packets in transit; jitter reorders them.
struct Link {
    config: LinkConfig,
    rng: Rng,
    /// (arrival time, towards the receiver, packet)
    in_transit: Vec<(u32, bool, Vec<u8>)>,
}

impl Link {
    fn new(config: LinkConfig, seed: u64) -> Self {
        Link {
            config,
            rng: Rng(seed),
            in_transit: Vec::new(),
        }
    }

    fn carry(&mut self, now: u32, packets: Vec<Vec<u8>>, forward: bool) {
        for packet in packets {
            if self.rng.percent(self.config.loss_pct) {
                continue;
            }
            let copies = if self.rng.percent(self.config.dup_pct) { 2 } else { 1 };
            for _ in 0..copies {
                let jitter = self.rng.below(self.config.jitter_ms as u64 + 1) as u32;
                let at = now + self.config.delay_ms + jitter;
                self.in_transit.push((at, forward, packet.clone()));
            }
        }
    }

    fn arrivals(&mut self, now: u32) -> Vec<(bool, Vec<u8>)> {
        let (due, later) = self.in_transit.drain(..).partition(|(at, _, _)| *at <= now);
        self.in_transit = later;
        let mut due: Vec<_> = due;
        due.sort_by_key(|(at, _, _)| *at);
        due.into_iter().map(|(_, forward, p)| (forward, p)).collect()
    }
}

/// Sends `messages` from `a` to `b` over `link` in 1 ms steps, flushing after input like the
/// engine does; returns what `b` received once `a` has nothing left to send, or at `max_ms`.
fn transfer(
    (a, wa): (&mut dyn Endpoint, &Wire),
    (b, wb): (&mut dyn Endpoint, &Wire),
    link: &mut Link,
    messages: &[Vec<u8>],
    max_ms: u32,
) -> Vec<Vec<u8>> {
    let mut next = 0;
    let mut received = Vec::new();
    let mut buf = vec![0u8; 256 * 1024];
    for now in 0..max_ms {
        while next < messages.len() && a.pending() < 512 && a.send_msg(&messages[next]) {
            next += 1;
        }
        a.tick(now);
        b.tick(now);
        link.carry(now, wa.take(), true);
        link.carry(now, wb.take(), false);
        for (forward, packet) in link.arrivals(now) {
            let to: &mut dyn Endpoint = if forward { &mut *b } else { &mut *a };
            to.input_packet(&packet);
            to.flush_now();
        }
        while let Some(n) = b.recv_msg(&mut buf) {
            received.push(buf[..n].to_vec());
        }
        if next == messages.len() && a.pending() == 0 && received.len() >= messages.len() {
            break;
        }
    }
    assert_eq!(next, messages.len(), "sender refused or never queued every message");
    received
}

fn sample_messages(rng: &mut Rng, count: usize, max_len: usize) -> Vec<Vec<u8>> {
    let mut messages: Vec<Vec<u8>> = [0, 1, MSS - 1, MSS, MSS + 1, 5000]
        .iter()
        .map(|&len| rng.bytes(len))
        .collect();
    messages.push(rng.bytes(max_len));
    while messages.len() < count {
        messages.push(rng.bytes_below(4000));
    }
    messages
}

fn assert_same(received: &[Vec<u8>], sent: &[Vec<u8>]) {
    assert_eq!(received.len(), sent.len(), "message count");
    for (i, (r, s)) in received.iter().zip(sent).enumerate() {
        assert!(r == s, "message {i} differs: {} vs {} bytes", r.len(), s.len());
    }
}

#[test]
fn messages_up_to_200_kb_arrive_intact_and_in_order() {
    let mut rng = Rng(1);
    let messages = sample_messages(&mut rng, 50, 200_000);
    let ((mut a, wa), (mut b, wb)) = (arq(9), arq(9));
    let mut link = Link::new(CLEAN, 2);
    let received = transfer((&mut a, &wa), (&mut b, &wb), &mut link, &messages, 5_000);
    assert_same(&received, &messages);
}

#[test]
fn loss_duplication_and_reordering_deliver_everything_once_in_order() {
    let lossy = LinkConfig {
        delay_ms: 20,
        jitter_ms: 15,
        loss_pct: 10,
        dup_pct: 5,
    };
    for seed in 1..4 {
        let mut rng = Rng(seed * 77);
        let messages = sample_messages(&mut rng, 400, 150_000);
        let ((mut a, wa), (mut b, wb)) = (arq(3), arq(3));
        let mut link = Link::new(lossy, seed);
        let received = transfer((&mut a, &wa), (&mut b, &wb), &mut link, &messages, 20_000);
        assert_same(&received, &messages);
        assert!(!a.is_dead_link());
    }
}

#[test]
fn interoperates_with_the_kcp_crate_both_ways() {
    let lossy = LinkConfig {
        delay_ms: 15,
        jitter_ms: 10,
        loss_pct: 5,
        dup_pct: 2,
    };
    let mut rng = Rng(5);
    // The crate refuses messages of 128 fragments or more.
    let messages = sample_messages(&mut rng, 200, 100_000);
    let ((mut ours, wo), (mut theirs, wt)) = (arq(11), ikcp(11));
    let mut link = Link::new(lossy, 6);
    let received = transfer((&mut ours, &wo), (&mut theirs, &wt), &mut link, &messages, 20_000);
    assert_same(&received, &messages);
    let mut link = Link::new(lossy, 7);
    let received = transfer((&mut theirs, &wt), (&mut ours, &wo), &mut link, &messages, 20_000);
    assert_same(&received, &messages);
}

fn pushes(packets: &[Vec<u8>]) -> Vec<u32> {
    segments(packets, Command::Push).map(|h| h.sn).collect()
}

fn segments(packets: &[Vec<u8>], cmd: Command) -> impl Iterator<Item = Header> + '_ {
    packets
        .iter()
        .flat_map(|p| Segments::new(p).map(Result::unwrap))
        .map(|(h, _)| h)
        .filter(move |h| h.cmd == cmd)
}

#[test]
fn lost_segment_is_fast_retransmitted_after_resend_acks() {
    let ((mut a, wa), (mut b, wb)) = (arq(1), arq(1));
    a.update(0).unwrap();
    b.update(0).unwrap();
    for i in 0..4u8 {
        a.send(&[i; MSS]).unwrap();
    }
    a.flush().unwrap();
    let packets = wa.take();
    assert_eq!(pushes(&packets), [0, 1, 2, 3]);
    assert_eq!(packets.len(), 4, "one full segment per packet");
    // Packet 0 is lost; each later one draws an ACK that skips sn 0.
    for (now, packet) in (1..).zip(&packets[1..3]) {
        b.input(packet).unwrap();
        b.flush().unwrap();
        a.update(now).unwrap();
        for ack in wb.take() {
            a.input(&ack).unwrap();
        }
        a.flush().unwrap();
        let resent = pushes(&wa.take());
        // resend = 2: the first skipping ACK is not enough, the second is.
        let expected: &[u32] = if now == 1 { &[] } else { &[0] };
        assert_eq!(resent, expected, "at {now} ms");
    }
    assert!(a.rtt.rto() >= RTO_MIN_NODELAY, "long before any RTO");
}

/// Times at which the only segment was (re)sent while every packet is lost.
fn send_times(a: &mut Wired, wire: &Wire, count: usize) -> Vec<(u32, bool)> {
    a.send(b"lost").unwrap();
    let mut times = Vec::new();
    let mut now = 0;
    while times.len() < count {
        assert!(now < 10_000_000, "stopped retransmitting");
        a.update(now).unwrap();
        if !pushes(&wire.take()).is_empty() {
            times.push((now, a.is_dead_link()));
        }
        now += 10;
    }
    times
}

fn gaps(times: &[(u32, bool)]) -> Vec<u32> {
    times.windows(2).map(|w| w[1].0 - w[0].0).collect()
}

#[test]
fn rto_backs_off_by_half_with_nodelay_and_the_link_dies_at_20_sends() {
    let (mut a, wire) = arq(1);
    a.set_nodelay(true, 10, 0, true);
    let times = send_times(&mut a, &wire, 21);
    let mut rto = 200u32;
    for gap in gaps(&times) {
        // Updates every 10 ms: a retransmission happens on the first update past its RTO.
        assert_eq!(gap, rto.div_ceil(10) * 10);
        rto += rto / 2;
    }
    let dead: Vec<bool> = times.iter().map(|&(_, dead)| dead).collect();
    assert!(dead[..19].iter().all(|d| !d), "alive for 19 sends");
    assert!(dead[19] && dead[20], "dead at the 20th");
}

#[test]
fn rto_doubles_without_nodelay() {
    let (mut a, wire) = arq(1);
    a.set_nodelay(false, 10, 0, true);
    let gaps = gaps(&send_times(&mut a, &wire, 5));
    // The first timeout adds an eighth of the RTO of slack.
    assert_eq!(gaps, [230, 400, 800, 1600]);
}

#[test]
fn window_limits_flight_and_a_zero_window_is_probed_until_it_opens() {
    let ((mut a, wa), (mut b, wb)) = (arq(4), arq(4));
    a.set_wndsize(8, 256);
    b.set_wndsize(256, 128);
    let messages: Vec<Vec<u8>> = (0..300u32).map(|i| i.to_le_bytes().repeat(25)).collect();
    for m in &messages {
        a.send(m).unwrap();
    }
    let mut link = Link::new(LinkConfig { delay_ms: 5, ..CLEAN }, 1);
    let mut first_ask = None;
    let mut received = Vec::new();
    let mut buf = vec![0u8; 4096];
    for now in 0..40_000 {
        a.current = now;
        let (span, limit) = (a.send.span(), a.send_window() as usize);
        a.flush().unwrap();
        assert!(a.send.span() <= span.max(limit).min(8), "window exceeded at {now} ms");
        b.update(now).unwrap();
        let sent = wa.take();
        if first_ask.is_none() && segments(&sent, Command::WindowAsk).next().is_some() {
            first_ask = Some(now);
        }
        link.carry(now, sent, true);
        link.carry(now, wb.take(), false);
        for (forward, packet) in link.arrivals(now) {
            let to = if forward { &mut b } else { &mut a };
            to.input(&packet).unwrap();
        }
        // The reader wakes up only after the sender had to probe.
        if first_ask.is_some_and(|t| now > t + 100) {
            while let Ok(n) = b.recv(&mut buf) {
                received.push(buf[..n].to_vec());
            }
        }
    }
    let asked = first_ask.expect("sender probed the zero window");
    assert!(asked >= 7_000, "probe waits 7 s, asked at {asked} ms");
    assert_same(&received, &messages);
}

/// The state `input` may change.
fn fingerprint(a: &Arq) -> String {
    format!(
        "{:?} {} {} {} {:?} {} {} {:?}",
        a,
        a.send.span(),
        a.send.waiting(),
        a.rmt_wnd,
        a.acks,
        a.probe.tell,
        a.cc.cwnd,
        a.peeksize().ok(),
    )
}

#[test]
fn malformed_input_is_rejected_without_effect() {
    let ((mut a, wa), (mut b, wb)) = (arq(21), arq(21));
    a.send(b"pending").unwrap();
    a.flush().unwrap();
    b.send(b"hello").unwrap();
    b.flush().unwrap();
    let valid = wb.take().remove(0);
    wa.take();
    let before = fingerprint(&a);

    let with = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut p = valid.clone();
        f(&mut p);
        p
    };
    let bad = [
        Vec::new(),
        valid[..10].to_vec(),
        valid[..HEADER_LEN - 1].to_vec(),
        valid[..valid.len() - 1].to_vec(),
        with(&|p| p[0] ^= 1),
        with(&|p| p[4] = 99),
        with(&|p| p.extend_from_slice(&[21, 0, 0, 0, 81])),
        with(&|p| {
            let mut foreign = valid.clone();
            foreign[0] = 22;
            p.extend_from_slice(&foreign);
        }),
    ];
    for (i, packet) in bad.iter().enumerate() {
        assert!(a.input(packet).is_err(), "case {i} accepted");
        assert_eq!(fingerprint(&a), before, "case {i} changed state");
    }
    assert!(matches!(
        a.input(&with(&|p| p[0] ^= 1)),
        Err(ArqError::ConvMismatch { .. })
    ));
    a.input(&valid).unwrap();
    assert_ne!(fingerprint(&a), before, "a valid segment does change state");
}

#[test]
fn random_input_never_panics() {
    let mut rng = Rng(99);
    let (mut a, wire) = arq(5);
    for i in 0..20_000u32 {
        if i % 50 == 0 {
            a.send(&rng.bytes_below(3000)).unwrap();
            a.update(i).unwrap();
            wire.take();
        }
        let packet = if rng.percent(50) {
            rng.bytes_below(100)
        } else {
            random_segments(&mut rng)
        };
        let _ = a.input(&packet);
        let _ = a.flush();
        let _ = a.recv(&mut [0u8; 64]);
    }
}

/// Well-formed segments with arbitrary fields, so the input logic itself gets exercised.
fn random_segments(rng: &mut Rng) -> Vec<u8> {
    let mut packet = Vec::new();
    for _ in 0..=rng.below(3) {
        let near = |rng: &mut Rng| {
            if rng.percent(70) {
                rng.below(600) as u32
            } else {
                rng.next() as u32
            }
        };
        let cmd = [Command::Push, Command::Ack, Command::WindowAsk, Command::WindowTell][rng.below(4) as usize];
        let payload = rng.bytes_below(40);
        let header = Header {
            conv: 5,
            cmd,
            frg: rng.below(4) as u8,
            wnd: rng.next() as u16,
            ts: near(rng),
            sn: near(rng),
            una: near(rng),
            len: payload.len() as u32,
        };
        packet.extend_from_slice(&header.emit());
        packet.extend_from_slice(&payload);
    }
    packet
}

#[test]
fn get_conv_reads_the_first_four_bytes() {
    assert_eq!(get_conv(&[1, 0, 0, 0, 9]), 1);
    assert_eq!(get_conv(&[1, 0, 0]), 0);
}

#[test]
fn oversized_messages_and_bad_mtus_are_refused() {
    let (mut a, _) = arq(1);
    assert!(matches!(
        a.send(&vec![0; MSS * 256]),
        Err(ArqError::MessageTooBig { fragments: 256 })
    ));
    assert_eq!(a.send(&vec![0; MSS * 255]).unwrap(), MSS * 255);
    assert!(a.set_mtu(49).is_err());
    assert!(a.set_mtu(50).is_ok());
}

#[test]
fn recv_reports_empty_incomplete_and_small_buffers() {
    let ((mut a, wa), (mut b, _)) = (arq(2), arq(2));
    assert!(matches!(b.recv(&mut [0; 8]), Err(ArqError::RecvQueueEmpty)));
    a.send(&[7; MSS + 10]).unwrap();
    a.flush().unwrap();
    let packets = wa.take();
    assert_eq!(packets.len(), 2);
    b.input(&packets[0]).unwrap();
    assert!(matches!(b.peeksize(), Err(ArqError::ExpectingFragment)));
    b.input(&packets[1]).unwrap();
    assert_eq!(b.peeksize().unwrap(), MSS + 10);
    assert!(matches!(
        b.recv(&mut [0; 8]),
        Err(ArqError::BufferTooSmall { need, have: 8 }) if need == MSS + 10
    ));
    let mut buf = vec![0; 2 * MSS];
    assert_eq!(b.recv(&mut buf).unwrap(), MSS + 10);
}

#[test]
fn shrinking_the_window_still_takes_what_the_old_window_let_the_peer_send() {
    let ((mut a, wa), (mut b, wb)) = (arq(6), arq(6));
    a.set_wndsize(1024, 1024);
    b.set_wndsize(1024, 1024);
    // The peer learns b's large window from a segment of b's.
    b.send(b"hello").unwrap();
    b.flush().unwrap();
    for packet in wb.take() {
        a.input(&packet).unwrap();
    }
    for i in 0..600u32 {
        a.send(&i.to_le_bytes()).unwrap();
    }
    a.flush().unwrap();
    let sent = wa.take();
    assert_eq!(pushes(&sent).len(), 600);
    // Another stream opened: b's window shrinks while those 600 are on the wire.
    b.set_wndsize(1024, 128);
    for packet in &sent {
        b.input(packet).unwrap();
    }
    b.flush().unwrap();
    let acked: Vec<u32> = segments(&wb.take(), Command::Ack).map(|h| h.sn).collect();
    assert_eq!(acked.len(), 600, "segments beyond the new window were dropped");
    let mut buf = [0u8; 64];
    for i in 0..600u32 {
        assert_eq!(b.recv(&mut buf).unwrap(), 4);
        assert_eq!(buf[..4], i.to_le_bytes());
    }
}

#[test]
fn growing_a_full_window_tells_the_peer_at_once() {
    let ((mut a, wa), (mut b, wb)) = (arq(7), arq(7));
    b.set_wndsize(256, 128);
    for i in 0..128u32 {
        a.send(&i.to_le_bytes()).unwrap();
    }
    a.flush().unwrap();
    for packet in wa.take() {
        b.input(&packet).unwrap();
    }
    b.flush().unwrap();
    let advertised: Vec<u16> = segments(&wb.take(), Command::Ack).map(|h| h.wnd).collect();
    assert_eq!(
        advertised.last(),
        Some(&0),
        "the reader has not read: the window is full"
    );
    b.set_wndsize(256, 512);
    b.flush().unwrap();
    let tells: Vec<u16> = segments(&wb.take(), Command::WindowTell).map(|h| h.wnd).collect();
    assert_eq!(tells, [384], "the peer must hear the window reopened");
}

/// A PUSH from a key holder, with fields the test chooses.
fn push(conv: u32, sn: u32, frg: u8, payload: &[u8]) -> Vec<u8> {
    let header = Header {
        conv,
        cmd: Command::Push,
        frg,
        wnd: 128,
        ts: 0,
        sn,
        una: 0,
        len: payload.len() as u32,
    };
    [&header.emit()[..], payload].concat()
}

#[test]
fn a_push_half_the_sequence_space_ahead_is_dropped_once_rcv_nxt_passed_the_old_edge() {
    let (mut b, _) = arq(8);
    b.set_wndsize(256, 128);
    // In-order data carries rcv_nxt past `accept_until`, which only moves on a resize.
    let mut buf = [0u8; 64];
    for sn in 0..1000u32 {
        b.input(&push(8, sn, 0, b"x")).unwrap();
        b.recv(&mut buf).unwrap();
    }
    let stale_edge = 256u32;
    // Before the fix this sn passed the window check and the ring grew to ~2^31 slots.
    let hostile = stale_edge.wrapping_add(1 << 31).wrapping_add(1);
    b.input(&push(8, hostile, 0, b"boom")).unwrap();
    assert!(b.recv_held() <= 256, "ring grew to {} slots", b.recv_held());
    assert!(b.peeksize().is_err(), "a segment outside the window was delivered");
}

mod adversarial {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Step {
        Segment {
            cmd: u8,
            frg: u8,
            wnd: u16,
            ts: u32,
            sn: u32,
            una: u32,
            len: u8,
        },
        Resize {
            snd: u16,
            rcv: u16,
        },
        Read,
        Update(u32),
        Send(u16),
    }

    /// Sequence numbers anywhere in u32, near the receiver's window, or near the
    /// dangerous half-way point.
    fn sequence() -> impl Strategy<Value = u32> {
        prop_oneof![
            any::<u32>(),
            0u32..2048,
            (0u32..4096).prop_map(|d| (1u32 << 31).wrapping_add(d).wrapping_sub(2048)),
        ]
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            6 => (81u8..=84, any::<u8>(), any::<u16>(), any::<u32>(), sequence(), sequence(), any::<u8>())
                .prop_map(|(cmd, frg, wnd, ts, sn, una, len)| Step::Segment { cmd, frg, wnd, ts, sn, una, len }),
            1 => (any::<u16>(), any::<u16>()).prop_map(|(snd, rcv)| Step::Resize { snd, rcv }),
            2 => Just(Step::Read),
            1 => any::<u32>().prop_map(Step::Update),
            1 => (0u16..4000).prop_map(Step::Send),
        ]
    }

    fn apply(a: &mut Wired, wire: &Wire, step: &Step) {
        match *step {
            Step::Segment {
                cmd,
                frg,
                wnd,
                ts,
                sn,
                una,
                len,
            } => {
                let payload = vec![0xa5; len as usize];
                let mut packet = push(9, sn, frg, &payload);
                packet[4] = cmd;
                packet[6..8].copy_from_slice(&wnd.to_le_bytes());
                packet[8..12].copy_from_slice(&ts.to_le_bytes());
                packet[16..20].copy_from_slice(&una.to_le_bytes());
                let _ = a.input(&packet);
            }
            Step::Resize { snd, rcv } => a.set_wndsize(snd, rcv),
            Step::Read => {
                let _ = a.recv(&mut vec![0u8; 256 * MSS]);
            }
            Step::Update(now) => {
                let _ = a.update(now);
            }
            Step::Send(len) => {
                let _ = a.send(&vec![1u8; len as usize]);
            }
        }
        let _ = a.flush();
        wire.take();
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Whatever a key holder sends, the receiver holds no more than the largest
        /// windows allow (ring and queue, u16::MAX segments each) and never panics.
        #[test]
        fn hostile_segments_never_grow_the_receiver_past_its_windows(
            steps in proptest::collection::vec(step(), 1..200)
        ) {
            let (mut a, wire) = arq(9);
            for step in &steps {
                apply(&mut a, &wire, step);
                prop_assert!(a.recv_held() <= 2 * u16::MAX as usize, "held {} after {:?}", a.recv_held(), step);
            }
        }
    }
}

#[test]
fn the_receive_floor_can_be_lowered_for_small_messages() {
    let ((mut a, wa), (mut b, wb)) = (arq(10), arq(10));
    let mut advertised = |b: &mut Wired| -> Vec<u16> {
        a.send(b"x").unwrap();
        a.flush().unwrap();
        for packet in wa.take() {
            b.input(&packet).unwrap();
        }
        b.flush().unwrap();
        segments(&wb.take(), Command::Ack).map(|h| h.wnd).collect()
    };
    b.set_wndsize(32, 32);
    assert_eq!(advertised(&mut b), [128 - 1], "ikcp's floor of 128 by default");
    b.set_min_rcv_wnd(16);
    b.set_wndsize(32, 32);
    assert_eq!(advertised(&mut b), [32 - 2]);
}
