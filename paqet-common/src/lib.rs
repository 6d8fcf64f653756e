//! Types shared by paqet's XDP program (`paqet-ebpf`) and its userspace (`paqet-user`).
//!
//! Everything here is `no_std` and allocation-free so the same code compiles for
//! `bpfel-unknown-none`. Map value types are `#[repr(C)]` with explicit padding so the
//! kernel, BTF and userspace agree on their layout byte for byte.
//!
//! * [`maps`]: the values stored in the BPF maps (filter, counters) and the map names.
//! * [`wire`]: the one outer-header parser (Ethernet, VLAN, IPv4/IPv6, TCP/UDP), run by
//!   the XDP program on every frame and by userspace on every frame it reads.
#![cfg_attr(not(test), no_std)]

pub mod maps;
pub mod wire;

pub use maps::{FilterConfig, Stats};
pub use wire::{Bytes, FrameSummary, ParseError};
