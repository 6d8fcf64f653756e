//! Copies bytes between one TCP connection and one engine stream, both ways, with
//! half-close: a FIN on either side becomes a FIN on the other. Either side failing
//! resets the stream, and a reset stream closes its TCP connection abortively, so
//! resources are freed on both ends of the relay.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use super::{Node, StreamWaker};
use crate::engine::StreamId;
use crate::engine::mux::ReadOutcome;
use crate::transport::Transport;

const TCP_READ_CHUNK: usize = 64 * 1024;
/// Stream data gathered for one write to TCP (plus room for one more message).
const TCP_WRITE_CHUNK: usize = 32 * 1024;

#[derive(Debug, PartialEq, Eq)]
enum End {
    /// Finished cleanly in this direction.
    Done,
    /// This direction failed or the stream was reset.
    Aborted,
}

pub async fn relay_stream<T: Transport>(node: Arc<Node<T>>, id: StreamId, waker: Arc<StreamWaker>, tcp: TcpStream) {
    let _ = tcp.set_nodelay(true);
    let fd = tcp.as_raw_fd();
    let (rd, wr) = tcp.into_split();
    let up = tcp_to_stream(&node, id, &waker, rd);
    let down = stream_to_tcp(&node, id, &waker, wr);
    tokio::pin!(up, down);
    let (mut up_end, mut down_end) = (None, None);
    // Both directions run until each is done; a failure in one ends both at once.
    while up_end.is_none() || down_end.is_none() {
        tokio::select! {
            end = &mut up, if up_end.is_none() => up_end = Some(end),
            end = &mut down, if down_end.is_none() => down_end = Some(end),
        }
        if up_end == Some(End::Aborted) || down_end == Some(End::Aborted) {
            node.reset_stream(id);
            // SAFETY: both halves (owners of the fd) are alive in `up`/`down` here.
            let sock = unsafe { BorrowedFd::borrow_raw(fd) };
            // SO_LINGER 0: the application sees a reset, not a clean end of data.
            let _ = socket2::SockRef::from(&sock).set_linger(Some(Duration::ZERO));
            break;
        }
    }
    tracing::debug!(stream = %id, ?up_end, ?down_end, "stream ended");
}

async fn tcp_to_stream<T: Transport>(node: &Node<T>, id: StreamId, waker: &StreamWaker, mut rd: OwnedReadHalf) -> End {
    let mut buf = vec![0u8; TCP_READ_CHUNK];
    loop {
        let n = match rd.read(&mut buf).await {
            Ok(0) => {
                return match node.with_engine(|e, _| e.stream_finish(id)) {
                    Ok(()) => End::Done,
                    Err(_) => End::Aborted,
                };
            }
            Ok(n) => n,
            Err(_) => return End::Aborted,
        };
        let mut off = 0;
        while off < n {
            match node.with_engine(|e, now| e.stream_write(now, id, &buf[off..n])) {
                Ok(taken) => off += taken,
                Err(_) => return End::Aborted,
            }
            if off < n {
                if waker.is_closed() {
                    return End::Aborted;
                }
                waker.writable.notified().await;
            }
        }
    }
}

async fn stream_to_tcp<T: Transport>(node: &Node<T>, id: StreamId, waker: &StreamWaker, mut wr: OwnedWriteHalf) -> End {
    let mut buf = vec![0u8; node.read_buffer_len() + TCP_WRITE_CHUNK];
    loop {
        match node.with_engine(|e, _| e.stream_read(id, &mut buf)) {
            Ok(ReadOutcome::Data(range)) => {
                if wr.write_all(&buf[range]).await.is_err() {
                    return End::Aborted;
                }
            }
            Ok(ReadOutcome::Fin) => {
                let _ = wr.shutdown().await;
                return End::Done;
            }
            Ok(ReadOutcome::WouldBlock) => {
                if waker.is_closed() {
                    return End::Aborted;
                }
                waker.readable.notified().await;
            }
            Err(_) => return End::Aborted,
        }
    }
}
