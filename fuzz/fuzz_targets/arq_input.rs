//! Our KCP, `paqet::engine::arq::Arq`, under whatever a key holder may send it: the fuzz
//! input is a script of operations against one `Arq`, as the `adversarial` proptest in
//! `paqet-user/src/engine/arq/tests.rs` does, over the whole u32 range of sequence
//! numbers, timestamps and clocks.
//!
//! The first byte configures the `Arq`: bit 0 kcptun's fast3 (`set_nodelay(true, 10, 2,
//! true)`), bits 1..=2 the MTU (1400, 50, 200, 576), bit 3 windows of 256 (else ikcp's
//! defaults). Then each op is one byte (its low four bits, modulo 9, pick it; bit 7 is its
//! flag) and its arguments; an input that ends mid-op reads zeros:
//!
//! - 0, 1: a datagram of 1..=8 well-formed segments with the `Arq`'s conv: command
//!   81..=84, any frg, wnd, ts, sn, una, up to 64 payload bytes;
//! - 2: a datagram of 1..=64 PUSHes with consecutive sequence numbers (a message's
//!   fragments when flag 0x80 is set), to move the receiver far along;
//! - 3: raw bytes as a datagram, their first four replaced by the conv when flag 0x80 is
//!   set;
//! - 4: `set_wndsize` with any two u16s;
//! - 5: `recv` (1 + bits 4..=5 times), into a 16 MiB buffer or, flag 0x80, a 64-byte one;
//! - 6: `update` at any u32 (flag 0x80) or the clock plus up to 65535 ms;
//! - 7: `send` of a message of up to 65535 bytes;
//! - 8: `flush`.
//!
//! A sequence number is a tag byte and its value: any u32, a small one, 2^31 plus a
//! small offset, or relative to what the `Arq` itself last sent: its `rcv_nxt` (the
//! `una` on its segments), that plus 2^31, or the `sn` of its last PUSH.
//!
//! After every op: the receiver holds at most 2 * u16::MAX segments (`recv_held`, ring
//! and queue, which the largest windows bound); every packet the `Arq` writes is at most
//! one MTU of whole, well-formed segments of its conversation; `recv` returns what
//! `peeksize` announced. Never a panic.

#![no_main]

use std::cell::{Cell, RefCell};
use std::io::{self, Write};
use std::rc::Rc;

use libfuzzer_sys::fuzz_target;
use paqet::engine::arq::{Arq, ArqError};

const CONV: u32 = 0x0a0b_0c0d;
const HEADER_LEN: usize = 24;
const MTUS: [usize; 4] = [1400, 50, 200, 576];
/// Larger than any message a peer can make us hold: u16::MAX fragments of at most 255
/// payload bytes (a raw datagram's).
const BIG_BUF: usize = 16 << 20;
const SMALL_BUF: usize = 64;
const MAX_PAYLOAD: usize = 64;

thread_local! {
    static BUF: RefCell<Vec<u8>> = RefCell::new(vec![0u8; BIG_BUF]);
}

fuzz_target!(init: seeds::write_if_asked(), |data: &[u8]| run(data));

fn run(data: &[u8]) {
    BUF.with_borrow_mut(|buf| Script::new(data, buf).run());
}

/// What the harness learns from the `Arq`'s own packets.
#[derive(Default)]
struct Seen {
    /// The `una` of the last segment it sent: its `rcv_nxt`.
    rcv_nxt: Cell<u32>,
    /// The `sn` of the last PUSH it sent.
    own_sn: Cell<u32>,
}

/// Discards what the `Arq` sends, after checking it is whole segments within one MTU.
struct Sink {
    mtu: usize,
    seen: Rc<Seen>,
}

impl Write for Sink {
    fn write(&mut self, packet: &[u8]) -> io::Result<usize> {
        assert!(
            (HEADER_LEN..=self.mtu).contains(&packet.len()),
            "a {}-byte packet with an MTU of {}",
            packet.len(),
            self.mtu
        );
        let mut rest = packet;
        while !rest.is_empty() {
            let (head, after) = rest
                .split_first_chunk::<HEADER_LEN>()
                .expect("a packet ends in a partial segment header");
            let u32_at = |at: usize| u32::from_le_bytes(head[at..at + 4].try_into().unwrap());
            assert_eq!(u32_at(0), CONV, "a segment of another conversation");
            let cmd = head[4];
            assert!((81..=84).contains(&cmd), "a segment with command {cmd}");
            let len = u32_at(20) as usize;
            assert!(len <= self.mtu - HEADER_LEN, "a {len}-byte payload");
            assert!(cmd == 81 || len == 0, "a control segment with a payload");
            let (_, after) = after.split_at_checked(len).expect("a packet ends in a partial payload");
            self.seen.rcv_nxt.set(u32_at(16));
            if cmd == 81 {
                self.seen.own_sn.set(u32_at(12));
            }
            rest = after;
        }
        Ok(packet.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct Script<'a> {
    input: &'a [u8],
    arq: Arq,
    sink: Sink,
    seen: Rc<Seen>,
    clock: u32,
    buf: &'a mut [u8],
}

impl<'a> Script<'a> {
    fn new(data: &'a [u8], buf: &'a mut [u8]) -> Script<'a> {
        let (config, input) = data.split_first().map_or((0, data), |(&c, r)| (c, r));
        let mtu = MTUS[(config as usize >> 1) % MTUS.len()];
        let seen = Rc::new(Seen::default());
        let mut arq = Arq::new(CONV);
        let sink = Sink {
            mtu,
            seen: seen.clone(),
        };
        if config & 1 != 0 {
            arq.set_nodelay(true, 10, 2, true);
        }
        arq.set_mtu(mtu).expect("a valid MTU");
        if config & 8 != 0 {
            arq.set_wndsize(256, 256);
        }
        Script {
            input,
            arq,
            sink,
            seen,
            clock: 0,
            buf,
        }
    }

    fn byte(&mut self) -> u8 {
        match self.input.split_first() {
            Some((&b, rest)) => {
                self.input = rest;
                b
            }
            None => 0,
        }
    }

    fn bytes(&mut self, len: usize) -> &'a [u8] {
        let (taken, rest) = self.input.split_at(len.min(self.input.len()));
        self.input = rest;
        taken
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte(), self.byte()])
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.byte(), self.byte(), self.byte(), self.byte()])
    }

    fn seq(&mut self) -> u32 {
        const HALF: u32 = 1 << 31;
        match self.byte() % 6 {
            0 => self.u32(),
            1 => u32::from(self.u16()),
            2 => HALF.wrapping_add(self.u16() as i16 as u32),
            3 => self.seen.rcv_nxt.get().wrapping_add(u32::from(self.u16())),
            4 => self
                .seen
                .rcv_nxt
                .get()
                .wrapping_add(HALF)
                .wrapping_add(self.u16() as i16 as u32),
            _ => self.seen.own_sn.get().wrapping_add(self.byte() as i8 as u32),
        }
    }

    fn payload_len(&mut self) -> usize {
        self.byte() as usize % (MAX_PAYLOAD + 1)
    }

    fn run(mut self) {
        while let Some((&op, rest)) = self.input.split_first() {
            self.input = rest;
            let flag = op & 0x80 != 0;
            match (op & 0x0f) % 9 {
                0 | 1 => {
                    let count = 1 + self.byte() % 8;
                    let mut datagram = Vec::new();
                    for _ in 0..count {
                        self.segment(&mut datagram);
                    }
                    self.input_datagram(&datagram);
                }
                2 => {
                    let start = self.seq();
                    let una = self.seq();
                    let count = 1 + self.byte() as u32 % 64;
                    let len = self.payload_len();
                    let mut datagram = Vec::new();
                    for i in 0..count {
                        let frg = if flag { (count - 1 - i) as u8 } else { 0 };
                        let header = Header {
                            cmd: 81,
                            frg,
                            wnd: 256,
                            ts: self.clock,
                            sn: start.wrapping_add(i),
                            una,
                        };
                        header.emit(&mut datagram, len);
                    }
                    self.input_datagram(&datagram);
                }
                3 => {
                    let len = self.byte() as usize;
                    let mut datagram = self.bytes(len).to_vec();
                    if flag && datagram.len() >= 4 {
                        datagram[..4].copy_from_slice(&CONV.to_le_bytes());
                    }
                    let _ = self.arq.input(&datagram);
                }
                4 => {
                    let (snd, rcv) = (self.u16(), self.u16());
                    self.arq.set_wndsize(snd, rcv);
                }
                5 => {
                    let times = 1 + (op >> 4 & 3) as usize;
                    for _ in 0..times {
                        self.recv(flag);
                    }
                }
                6 => {
                    self.clock = if flag {
                        self.u32()
                    } else {
                        self.clock.wrapping_add(u32::from(self.u16()))
                    };
                    let _ = self.arq.update(self.clock, &mut self.sink);
                }
                7 => {
                    let len = self.u16() as usize;
                    let message = vec![0x5a; len];
                    if let Ok(n) = self.arq.send(&message) {
                        assert_eq!(n, len, "send took part of a message");
                    }
                }
                _ => {
                    let _ = self.arq.flush(&mut self.sink);
                }
            }
            let held = self.arq.recv_held();
            assert!(
                held <= 2 * u16::MAX as usize,
                "the receiver holds {held} segments after op {op}: {:?}",
                self.arq
            );
        }
    }

    /// One well-formed segment with our conv and fields from the input.
    fn segment(&mut self, datagram: &mut Vec<u8>) {
        let cmd_byte = self.byte();
        let frg = self.byte();
        let wnd = self.u16();
        let ts = if cmd_byte & 0x80 != 0 {
            self.clock.wrapping_sub(u32::from(self.byte()))
        } else {
            self.u32()
        };
        let sn = self.seq();
        let una = self.seq();
        let len = self.payload_len();
        let header = Header {
            cmd: 81 + cmd_byte % 4,
            frg,
            wnd,
            ts,
            sn,
            una,
        };
        header.emit(datagram, len);
    }

    fn input_datagram(&mut self, datagram: &[u8]) {
        match self.arq.input(datagram) {
            Ok(n) => assert_eq!(n, datagram.len()),
            Err(e) => panic!("a well-formed datagram of our conversation refused: {e}"),
        }
    }

    fn recv(&mut self, small: bool) {
        let buf = if small {
            &mut self.buf[..SMALL_BUF]
        } else {
            &mut self.buf[..]
        };
        let peek = self.arq.peeksize();
        let got = self.arq.recv(buf);
        match (&peek, &got) {
            (Ok(size), Ok(n)) => assert_eq!(size, n, "recv and peeksize disagree"),
            (Ok(size), Err(ArqError::BufferTooSmall { need, .. })) => {
                assert!(*size > buf.len() && need == size)
            }
            (Err(_), Err(_)) => {}
            _ => panic!("peeksize {peek:?} but recv {got:?}"),
        }
    }
}

/// A segment header without conv (ours) and len (what follows).
struct Header {
    cmd: u8,
    frg: u8,
    wnd: u16,
    ts: u32,
    sn: u32,
    una: u32,
}

impl Header {
    fn emit(&self, out: &mut Vec<u8>, payload_len: usize) {
        out.extend_from_slice(&CONV.to_le_bytes());
        out.push(self.cmd);
        out.push(self.frg);
        out.extend_from_slice(&self.wnd.to_le_bytes());
        out.extend_from_slice(&self.ts.to_le_bytes());
        out.extend_from_slice(&self.sn.to_le_bytes());
        out.extend_from_slice(&self.una.to_le_bytes());
        out.extend_from_slice(&(payload_len as u32).to_le_bytes());
        out.extend((0..payload_len).map(|i| (self.sn as usize).wrapping_add(i) as u8));
    }
}

/// A few valid scripts, written by `cargo xtask fuzz` through PAQET_FUZZ_SEEDS=DIR before
/// libFuzzer reads the corpus (libFuzzer calls the init hook first).
mod seeds {
    pub fn write_if_asked() {
        let Some(dir) = std::env::var_os("PAQET_FUZZ_SEEDS") else {
            return;
        };
        let dir = std::path::PathBuf::from(dir);
        std::fs::create_dir_all(&dir).expect("creating the seed directory");
        for (name, bytes) in all() {
            std::fs::write(dir.join(format!("seed-{name}")), bytes).expect("writing a seed");
        }
    }

    /// Script builder.
    struct S(Vec<u8>);

    impl S {
        /// fast3, MTU 1400, windows of 256.
        fn new() -> S {
            S(vec![1 | 8])
        }
        fn b(mut self, bytes: &[u8]) -> S {
            self.0.extend_from_slice(bytes);
            self
        }
        /// Sequence number tag 1: a small absolute one.
        fn small(self, sn: u16) -> S {
            self.b(&[1]).b(&sn.to_le_bytes())
        }
        /// Sequence number tag 3: the receiver's rcv_nxt plus `d`.
        fn near_rcv_nxt(self, d: u16) -> S {
            self.b(&[3]).b(&d.to_le_bytes())
        }
        /// Sequence number tag 4: the receiver's rcv_nxt plus 2^31 plus `d`.
        fn opposite(self, d: i16) -> S {
            self.b(&[4]).b(&d.to_le_bytes())
        }
        /// Sequence number tag 5: our last PUSH plus `d`.
        fn own(self, d: i8) -> S {
            self.b(&[5, d as u8])
        }
        /// Then the start and una sequence numbers, then `tail`.
        fn run(self, message: bool) -> S {
            self.b(&[if message { 0x80 | 2 } else { 2 }])
        }
        fn tail(self, count: u8, len: u8) -> S {
            self.b(&[count - 1, len])
        }
        fn resize(self, snd: u16, rcv: u16) -> S {
            self.b(&[4]).b(&snd.to_le_bytes()).b(&rcv.to_le_bytes())
        }
        fn recv(self, times: u8) -> S {
            self.b(&[5 | (times - 1) << 4])
        }
        fn tick(self, ms: u16) -> S {
            self.b(&[6]).b(&ms.to_le_bytes())
        }
        fn clock(self, at: u32) -> S {
            self.b(&[0x80 | 6]).b(&at.to_le_bytes())
        }
        fn send(self, len: u16) -> S {
            self.b(&[7]).b(&len.to_le_bytes())
        }
        fn flush(self) -> S {
            self.b(&[8])
        }
    }

    pub fn all() -> Vec<(&'static str, Vec<u8>)> {
        // In order: 64 single-segment messages from 0, read, then a 3-fragment message.
        let in_order = S::new()
            .run(false)
            .small(0)
            .small(0)
            .tail(64, 16)
            .recv(4)
            .run(true)
            .near_rcv_nxt(0)
            .small(0)
            .tail(3, 64)
            .recv(1)
            .tick(10)
            .0;
        // Past a hole, then the hole filled; a push 2^31 past rcv_nxt (a past bug).
        let hole = S::new()
            .run(false)
            .near_rcv_nxt(1)
            .small(0)
            .tail(8, 8)
            .flush()
            .run(false)
            .near_rcv_nxt(0)
            .small(0)
            .tail(1, 8)
            .recv(4)
            .resize(256, 128)
            .run(false)
            .opposite(1)
            .small(0)
            .tail(1, 4)
            .recv(1)
            .0;
        // We send, the peer acknowledges (ACK for our sn, una past it), the clock jumps.
        let ack = S::new()
            .send(3000)
            .tick(10)
            .b(&[0, 1]) // datagram of two segments
            .b(&[0x80 | 1, 0]) // ACK, ts from the clock
            .b(&128u16.to_le_bytes())
            .b(&[5])
            .own(0)
            .small(0)
            .b(&[0])
            .b(&[0x80 | 2, 0]) // window ask
            .b(&0u16.to_le_bytes())
            .b(&[0])
            .small(0)
            .own(1)
            .b(&[0])
            .tick(20)
            .clock(u32::MAX - 5)
            .tick(100)
            .send(100)
            .flush()
            .0;
        // The window grown to the largest, filled far ahead, shrunk, then read.
        let windows = S::new()
            .resize(u16::MAX, u16::MAX)
            .run(false)
            .near_rcv_nxt(u16::MAX - 64)
            .small(0)
            .tail(64, 0)
            .resize(1, 1)
            .run(false)
            .near_rcv_nxt(1)
            .small(0)
            .tail(64, 0)
            .run(false)
            .near_rcv_nxt(0)
            .small(0)
            .tail(1, 0)
            .recv(4)
            .flush()
            .0;
        // Raw bytes with our conv: a truncated header.
        let raw = S::new().b(&[0x80 | 3, 10]).b(&[0; 10]).recv(1).0;
        vec![
            ("in-order", in_order),
            ("hole", hole),
            ("ack", ack),
            ("windows", windows),
            ("raw", raw),
        ]
    }
}
