//! paqet: a relay that carries SOCKS5 streams over KCP in packets it builds itself.
//!
//! The folders follow one byte's journey: `socks` (client edge) → `node` (drives the
//! engine with tokio) → `engine` (sans-IO streams, KCP sessions, sealed frames) →
//! `transport` (the wire) → the server's `engine` → `dial` (server edge). `kernel`
//! loads the XDP side; `config`/`cli` are what the user says; `roles` starts a role;
//! `ops` holds `check` and `status`.

pub mod cli;
pub mod config;
pub mod dial;
pub mod engine;
pub mod kernel;
pub mod node;
pub mod ops;
pub mod roles;
pub mod socks;
pub mod sync;
pub mod transport;
