//! The SOCKS5 request path the client exposes on its SOCKS port: fast-socks5's
//! `accept_no_auth` / `accept_password_auth`, then `read_command`, exactly as
//! `paqet::socks` drives them, over an in-memory stream whose client side is the fuzz
//! input. Then the requested target the way paqet converts it, and paqet's own
//! `TargetAddr::parse` on the same bytes.
//!
//! The first input byte is the harness's choice: bit 0 password auth (else none), bits
//! 1..=3 the most bytes one read returns (0: unlimited), bit 4 every other read pending
//! first (as a slow client). The rest is what the SOCKS client sends.
//!
//! Must never panic, and never take longer than the time bound: the stream ends where
//! the input does, so every read that wants more gets end-of-file.

#![no_main]

use std::cell::Cell;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use fast_socks5::server::Socks5ServerProtocol;
use fast_socks5::util::target_addr::TargetAddr as SocksTarget;
use libfuzzer_sys::fuzz_target;
use paqet::engine::frame::TargetAddr;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A SOCKS request must be read (or refused) within this, whatever the bytes.
const TIME_BOUND: Duration = Duration::from_secs(2);
/// Replies the server may write before the harness calls it a flood.
const MAX_REPLY: usize = 4096;

thread_local! {
    static RUNTIME: tokio::runtime::Runtime =
        tokio::runtime::Builder::new_current_thread().enable_time().build().expect("tokio runtime");
}

fuzz_target!(init: seeds::write_if_asked(), |data: &[u8]| run(data));

fn run(data: &[u8]) {
    // paqet's own address parser, on the whole input and on every suffix a request's
    // address could start at.
    for start in 0..data.len().min(8) {
        if let Ok((addr, used)) = TargetAddr::parse(&data[start..]) {
            let mut out = Vec::new();
            addr.emit(&mut out).expect("a parsed address emits");
            assert_eq!(out[..], data[start..start + used]);
        }
    }
    let Some((&choice, client_bytes)) = data.split_first() else {
        return;
    };
    let password = choice & 1 != 0;
    let chunk = match (choice >> 1) & 7 {
        0 => usize::MAX,
        n => n as usize,
    };
    let consumed = Cell::new(0);
    let stream = Client {
        input: client_bytes,
        consumed: &consumed,
        written: Vec::new(),
        chunk,
        stall: choice & 0x10 != 0,
        stalled: false,
    };
    RUNTIME.with(|rt| {
        let outcome = rt.block_on(async {
            tokio::time::timeout(TIME_BOUND, negotiate(stream, password)).await
        });
        let Ok(result) = outcome else {
            panic!("SOCKS negotiation hung on {} input bytes", data.len())
        };
        if let Some(target) = result {
            // What was read ends with the request's address.
            check_target(target, &client_bytes[..consumed.get()]);
        }
    });
}

/// What `paqet::socks::SocksFrontend::handle` does before it opens a stream.
async fn negotiate(stream: Client<'_>, password: bool) -> Option<SocksTarget> {
    let proto = if password {
        let check = |user: String, pass: String| user == "alice" && pass == "s3cret";
        Socks5ServerProtocol::accept_password_auth(stream, check)
            .await
            .ok()?
            .0
    } else {
        Socks5ServerProtocol::accept_no_auth(stream).await.ok()?
    };
    let (_proto, _command, target) = proto.read_command().await.ok()?;
    Some(target)
}

/// paqet carries the target as SOCKS encodes it (same ATYP codes, same layout): its
/// encoding must be the very bytes the request ended with, and parse back.
fn check_target(target: SocksTarget, read: &[u8]) {
    let paqet_target = match target {
        SocksTarget::Ip(addr) => TargetAddr::Ip(addr),
        SocksTarget::Domain(host, port) => TargetAddr::Domain(host, port),
    };
    let mut out = Vec::new();
    // SOCKS names are at most 255 bytes, so paqet can always carry them.
    paqet_target
        .emit(&mut out)
        .expect("a SOCKS target always emits");
    assert!(
        read.ends_with(&out),
        "paqet's encoding differs from the SOCKS request's address"
    );
    match TargetAddr::parse(&out) {
        Ok((back, used)) => {
            assert_eq!(back, paqet_target);
            assert_eq!(used, out.len());
        }
        // The one SOCKS target paqet's server refuses to parse: an empty name.
        Err(_) => assert!(matches!(&paqet_target, TargetAddr::Domain(h, _) if h.is_empty())),
    }
}

/// The SOCKS client's side of the connection: reads come from the fuzz input (then
/// end-of-file), writes (the server's replies) are collected.
struct Client<'a> {
    input: &'a [u8],
    consumed: &'a Cell<usize>,
    written: Vec<u8>,
    chunk: usize,
    stall: bool,
    stalled: bool,
}

impl AsyncRead for Client<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.stall && !self.stalled {
            self.stalled = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        self.stalled = false;
        let n = self.input.len().min(buf.remaining()).min(self.chunk);
        let (now, later) = self.input.split_at(n);
        buf.put_slice(now);
        self.input = later;
        self.consumed.set(self.consumed.get() + n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Client<'_> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        assert!(
            self.written.len() + data.len() <= MAX_REPLY,
            "server wrote more than {MAX_REPLY} bytes of replies"
        );
        self.written.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

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

    fn request(atyp_and_addr: &[u8]) -> Vec<u8> {
        [&[5u8, 1, 0][..], atyp_and_addr].concat()
    }

    pub fn all() -> Vec<(&'static str, Vec<u8>)> {
        let no_auth = [5u8, 1, 0];
        let password_greeting = [5u8, 1, 2];
        let login = [&[1u8, 5][..], b"alice", &[6], b"s3cret"].concat();
        let v4 = request(&[1, 198, 18, 0, 2, 0, 80]);
        let v6 = request(&[
            4, 0x20, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0x01, 0xbb,
        ]);
        let domain = request(&[&[3u8, 11][..], b"origin.test", &[0x1f, 0x90]].concat());
        let udp = [&[5u8, 3, 0][..], &[1, 0, 0, 0, 0, 0, 0]].concat();
        let mk = |choice: u8, parts: &[&[u8]]| [&[choice][..], &parts.concat()].concat();
        vec![
            ("noauth-v4", mk(0, &[&no_auth, &v4])),
            ("noauth-v6-chunked", mk(2 << 1, &[&no_auth, &v6])),
            (
                "noauth-domain-stalling",
                mk(0x10 | 1 << 1, &[&no_auth, &domain]),
            ),
            ("noauth-udp", mk(0, &[&no_auth, &udp])),
            (
                "password-domain",
                mk(1, &[&password_greeting, &login, &domain]),
            ),
            (
                "password-wrong",
                mk(1, &[&password_greeting, &[1, 1, b'a', 1, b'b'], &v4]),
            ),
        ]
    }
}
