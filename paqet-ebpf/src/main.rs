//! paqet's kernel side: `paqet_steer`, an XDP program that takes paqet's own frames off
//! the interface (into an AF_XDP socket) and hands everything else to the kernel.
//!
//! Built by `cargo xtask build` for `bpfel-unknown-none`; `paqet-user` embeds the object.
//! The outer-header parsing is `paqet_common::wire`, the same code userspace runs.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    btf_maps::{Array, PerCpuArray, XskMap},
    macros::{btf_map, xdp},
    programs::XdpContext,
};
use aya_log_ebpf::debug;
use paqet_common::{
    maps::{FilterConfig, MAX_QUEUES, Stats},
    wire::{Bytes, ParseError, parse_frame},
};

/// Written by userspace; entry 0 is the only one.
#[btf_map]
static PAQET_FILTER: Array<FilterConfig, 1> = Array::new();

#[btf_map]
static PAQET_STATS: PerCpuArray<Stats, 1> = PerCpuArray::new();

/// AF_XDP socket per RX queue; userspace fills the slots of the queues it serves.
#[btf_map]
static PAQET_XSKS: XskMap<{ MAX_QUEUES as usize }> = XskMap::new();

/// The frame as the parser sees it. Each load checks `data + off + N <= data_end`
/// immediately before dereferencing, which is what the verifier wants to see.
struct Frame {
    start: usize,
    end: usize,
}

impl Bytes for Frame {
    #[inline(always)]
    fn load<const N: usize>(&self, off: usize) -> Option<[u8; N]> {
        let p = self.start + off;
        if p + N > self.end {
            return None;
        }
        // SAFETY: [p, p + N) was just checked to lie inside the packet; u8 arrays have
        // no alignment requirement and every bit pattern is valid.
        Some(unsafe { core::ptr::read_unaligned(p as *const [u8; N]) })
    }

    #[inline(always)]
    fn len(&self) -> usize {
        self.end - self.start
    }
}

#[xdp]
pub fn paqet_steer(ctx: XdpContext) -> u32 {
    let Some(stats) = PAQET_STATS.get_ptr_mut(0) else {
        // Cannot happen for index 0 of a 1-entry array; passing is the safe answer.
        return xdp_action::XDP_PASS;
    };
    // SAFETY: per-CPU slot, and XDP programs do not nest on one CPU, so nobody else
    // writes it concurrently.
    let stats = unsafe { &mut *stats };
    stats.seen += 1;
    let action = steer(&ctx, stats);
    if action == xdp_action::XDP_PASS {
        stats.passed += 1;
    }
    action
}

#[inline(always)]
fn steer(ctx: &XdpContext, stats: &mut Stats) -> u32 {
    let frame = Frame {
        start: ctx.data(),
        end: ctx.data_end(),
    };
    let summary = match parse_frame(&frame) {
        Ok(s) => s,
        Err(ParseError::Unsupported) => return xdp_action::XDP_PASS,
        Err(e) => {
            stats.malformed += 1;
            // Logged at 1, 2, 4, 8, ... per CPU: a flood of bad frames must not turn
            // into a flood of log records.
            if stats.malformed & (stats.malformed - 1) == 0 {
                let truncated = matches!(e, ParseError::Truncated) as u8;
                debug!(
                    ctx,
                    "paqet_steer: malformed frame (len {}, truncated {}), {} so far on this CPU",
                    frame.len(),
                    truncated,
                    stats.malformed
                );
            }
            return xdp_action::XDP_PASS;
        }
    };
    let Some(filter) = PAQET_FILTER.get(0) else {
        return xdp_action::XDP_PASS;
    };
    if !filter.matches(&summary) {
        return xdp_action::XDP_PASS;
    }
    stats.matched += 1;
    if !filter.redirect() {
        return xdp_action::XDP_PASS;
    }
    // The low bits of the flags are the action the helper returns when the queue has no
    // socket: the frame then goes to the kernel instead of being dropped.
    match PAQET_XSKS.redirect(ctx.rx_queue_index(), xdp_action::XDP_PASS as u64) {
        Ok(action) => {
            stats.redirected += 1;
            action
        }
        Err(_) => {
            stats.no_socket += 1;
            xdp_action::XDP_PASS
        }
    }
}

// Dual MIT/GPL: a GPL-compatible licence string, so the verifier lets the program use
// every helper aya-log needs; paqet's own licence (MIT OR Apache-2.0) allows it.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any path that could reach this (it is an endless loop), so
    // a panic in the program shows up at load time, never at run time.
    loop {}
}
