//! Support for paqet's end-to-end tests: network namespaces joined by veth links, child
//! process guards, bounded waits, and where the binary under test is.
//!
//! Tests that need root call [`require_root`] first: without root they are skipped
//! loudly, except under CI, where skipping would hide a broken suite and so panics.

#[cfg(feature = "bench")]
pub mod bench;
pub mod capture;
pub mod container;
pub mod linkem;
pub mod netns;
pub mod pattern;
pub mod relay;
pub mod router;
pub mod scenarios;
pub mod service;
pub mod socks;
pub mod udp;

pub use netns::{ChildGuard, Netns, TwoHosts, fmt_mac, paqet_bin, require_root, run_checked, veth, wait_for};
