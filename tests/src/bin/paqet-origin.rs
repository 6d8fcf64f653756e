//! The tests' origin web server: `GET /bytes/N` answers N deterministic bytes (body seed
//! N, see `paqet_tests::pattern`), `GET /open` the number of connections open right now,
//! so a test can see that the relay closed its side of a stream.
//!
//! Usage: paqet-origin LISTEN_ADDR

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use paqet_tests::pattern;

fn respond(stream: &mut TcpStream, open: &AtomicUsize) -> std::io::Result<()> {
    let mut line = String::new();
    let mut reader = BufReader::new(stream.try_clone()?);
    reader.read_line(&mut line)?;
    // Skip the headers: the body never depends on them.
    let mut header = String::new();
    while reader.read_line(&mut header)? > 2 {
        header.clear();
    }
    let path = line.split_whitespace().nth(1).unwrap_or("/");
    if path == "/open" {
        // This connection itself is not counted.
        let body = (open.load(Ordering::SeqCst) - 1).to_string();
        return write!(
            stream,
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    }
    let Some(len) = path.strip_prefix("/bytes/").and_then(|n| n.parse::<u64>().ok()) else {
        return write!(
            stream,
            "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
    };
    write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut sent = 0u64;
    while sent < len {
        let n = (len - sent).min(buf.len() as u64) as usize;
        pattern::fill(len, sent, &mut buf[..n]);
        stream.write_all(&buf[..n])?;
        sent += n as u64;
    }
    Ok(())
}

fn main() {
    let Some(addr) = std::env::args().nth(1) else {
        eprintln!("usage: paqet-origin LISTEN_ADDR");
        std::process::exit(2);
    };
    let listener = match TcpListener::bind(&addr) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("paqet-origin: cannot listen on {addr}: {e}");
            std::process::exit(1);
        }
    };
    let open = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        let Ok(mut stream) = conn else { continue };
        let open = open.clone();
        open.fetch_add(1, Ordering::SeqCst);
        std::thread::spawn(move || {
            let _ = respond(&mut stream, &open);
            open.fetch_sub(1, Ordering::SeqCst);
        });
    }
}
