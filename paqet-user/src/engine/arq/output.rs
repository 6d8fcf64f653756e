//! Packs segments into packets of at most one MTU and hands each packet to the writer.

use std::io::{self, Write};

use super::segment::{HEADER_LEN, Header};

#[derive(Debug)]
pub struct Packer<W> {
    packet: Vec<u8>,
    pub mtu: usize,
    pub writer: W,
}

impl<W: Write> Packer<W> {
    pub fn new(mtu: usize, writer: W) -> Self {
        Packer {
            packet: Vec::with_capacity(mtu),
            mtu,
            writer,
        }
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
        let written = self.writer.write_all(&self.packet);
        self.packet.clear();
        written
    }
}
