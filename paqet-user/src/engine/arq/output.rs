//! Packs segments into packets of at most one MTU and hands each packet to the caller's
//! sink, one `write` per packet.

use std::io::{self, Write};

use super::segment::{HEADER_LEN, Header};

/// One flush's packer: the conversation lends its packet buffer (kept between flushes,
/// so packing allocates nothing) and the caller lends the sink.
pub struct Packer<'a, W> {
    packet: Vec<u8>,
    mtu: usize,
    sink: &'a mut W,
}

impl<'a, W: Write> Packer<'a, W> {
    pub fn new(packet: Vec<u8>, mtu: usize, sink: &'a mut W) -> Self {
        Packer { packet, mtu, sink }
    }

    pub fn push(&mut self, header: &Header, payload: &[u8]) -> io::Result<()> {
        if self.packet.len() + HEADER_LEN + payload.len() > self.mtu {
            self.finish()?;
        }
        self.packet.extend_from_slice(&header.emit());
        self.packet.extend_from_slice(payload);
        Ok(())
    }

    /// Writes the partly filled packet, if any.
    pub fn finish(&mut self) -> io::Result<()> {
        if self.packet.is_empty() {
            return Ok(());
        }
        let written = self.sink.write_all(&self.packet);
        self.packet.clear();
        written
    }

    /// The packet buffer back, empty, for the next flush.
    pub fn into_buffer(mut self) -> Vec<u8> {
        self.packet.clear();
        self.packet
    }
}
