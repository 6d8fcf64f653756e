//! paqet: a relay that carries SOCKS5 streams over KCP in packets it builds itself.
//!
//! The folders follow one byte's journey: `socks` (client edge) → `engine` (sans-IO
//! streams, KCP sessions, sealed frames) → `transport` (the wire) → `engine` on the
//! server → `dial` (server edge). `kernel` loads the XDP side; `config`/`cli` are what
//! the user says; `node` wires the edges to the engine with tokio.

pub mod cli;
pub mod config;
pub mod engine;
pub mod kernel;
