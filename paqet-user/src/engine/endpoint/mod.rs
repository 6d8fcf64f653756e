//! The endpoint: what spans peers. It routes each datagram to its connection by the
//! session index it names, admits and answers handshakes, holds the global limits
//! (peers, the window budget shared by all streams, queued segments) and schedules
//! output. Its state is [`Engine`](super::Engine); its work is here, by side:
//! `input` (datagrams in), `handshakes` (server: admission and answers), `admission`
//! (the handshake limiter and cookies), `client` (handshakes with the server, paths,
//! reachability), `streams` (the edge's stream calls and the window budget),
//! `peers` (per-peer ticks, forgetting, overflow reports), `output` (flushes and
//! delayed ACKs) and `timers`.

pub(super) mod admission;
mod client;
mod handshakes;
mod input;
mod output;
mod peers;
mod streams;
mod timers;

pub(super) use admission::Admission;
pub(super) use client::ClientState;
pub use client::{PATH_FALLBACK_AFTER, SERVER_UNANSWERED_AFTER};
#[cfg(test)]
pub(super) use {output::ACK_DELAY, streams::LINGER};
