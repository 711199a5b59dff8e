//! Flush consolidation for the gRPC connections.
//!
//! HTTP/2 answers a unary gRPC call with three frames (response HEADERS, DATA, trailer
//! HEADERS), produced by the stream's task, while the connection's task writes frames
//! to the socket and flushes at the end of each of its polls. The two tasks interleave,
//! so left alone a response goes out as two TLS records in two `writev` calls (the
//! trailers, 32 bytes on the wire, on their own), and answers that become ready
//! together — a whole group commit of the audit log releases several at once — each
//! pay for their own system call, and for a wake-up of the peer.
//!
//! [`CoalescedFlush`] holds plaintext writes in a buffer and turns the first flush
//! request after new data into a yield: the connection task goes to the back of the
//! run queue, the stream tasks that are ready add their frames, and the next flush
//! writes everything as one TLS record. A flush is deferred at most once, by one
//! scheduler pass, so latency grows by microseconds; under load one system call carries
//! several frames. Netty's `FlushConsolidationHandler` does the same for the same
//! reason.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Above this many buffered bytes, writes go through without waiting for a flush (one
/// TLS record holds 16 KiB of plaintext).
const BUFFER_LIMIT: usize = 16 * 1024;

/// An I/O stream whose writes are gathered until a flush, and whose flushes are
/// deferred by one scheduler pass (see the module documentation).
pub struct CoalescedFlush<T> {
    inner: T,
    buf: Vec<u8>,
    /// Bytes of `buf` already handed to `inner`.
    written: usize,
    /// Whether the current flush has already yielded once.
    yielded: bool,
}

impl<T> CoalescedFlush<T> {
    /// Wraps `inner`.
    pub fn new(inner: T) -> Self {
        CoalescedFlush {
            inner,
            // Allocated on the first write of each flush and released after it: an
            // idle connection (most of them) holds no buffer.
            buf: Vec::new(),
            written: 0,
            yielded: false,
        }
    }
}

impl<T: AsyncWrite + Unpin> CoalescedFlush<T> {
    /// Hands the whole buffer to `inner`.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.buf.len() {
            let n = std::task::ready!(
                Pin::new(&mut self.inner).poll_write(cx, &self.buf[self.written..])
            )?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.buf.clear();
        self.written = 0;
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for CoalescedFlush<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for CoalescedFlush<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(data)])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if this.buf.len() + total > BUFFER_LIMIT {
            std::task::ready!(this.poll_drain(cx))?;
            if total >= BUFFER_LIMIT {
                return Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
            }
        }
        if this.buf.capacity() == 0 {
            this.buf.reserve(total.max(4096));
        }
        for b in bufs {
            this.buf.extend_from_slice(b);
        }
        Poll::Ready(Ok(total))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.buf.len() > this.written && !this.yielded {
            // Let the tasks that are ready add their frames first (module docs).
            this.yielded = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        std::task::ready!(this.poll_drain(cx))?;
        this.yielded = false;
        this.buf = Vec::new();
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        std::task::ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Records each write it is given, as the socket would see it.
    #[derive(Default)]
    struct Sink {
        writes: Vec<Vec<u8>>,
        flushes: usize,
    }

    impl AsyncWrite for Sink {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.writes.push(data.to_vec());
            Poll::Ready(Ok(data.len()))
        }
        fn poll_flush(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.flushes += 1;
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    struct CountWakes(AtomicUsize);
    impl Wake for CountWakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn first_flush_yields_then_one_write_carries_everything() {
        let wakes = Arc::new(CountWakes(AtomicUsize::new(0)));
        let waker = std::task::Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        let mut io = CoalescedFlush::new(Sink::default());

        // Response headers and data, then a flush: nothing reaches the socket yet, and
        // the task is woken to come back.
        for frame in [&b"headers"[..], b"data"] {
            assert!(matches!(
                Pin::new(&mut io).poll_write(&mut cx, frame),
                Poll::Ready(Ok(n)) if n == frame.len()
            ));
        }
        assert!(Pin::new(&mut io).poll_flush(&mut cx).is_pending());
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
        assert!(io.inner.writes.is_empty());

        // Meanwhile the trailers arrive; the second flush writes all three at once.
        let slices = [io::IoSlice::new(b"trail"), io::IoSlice::new(b"ers")];
        assert!(matches!(
            Pin::new(&mut io).poll_write_vectored(&mut cx, &slices),
            Poll::Ready(Ok(8))
        ));
        assert!(matches!(
            Pin::new(&mut io).poll_flush(&mut cx),
            Poll::Ready(Ok(()))
        ));
        assert_eq!(io.inner.writes, vec![b"headersdatatrailers".to_vec()]);
        assert_eq!(io.inner.flushes, 1);

        // With nothing buffered a flush goes straight through, and the next batch is
        // deferred again.
        assert!(Pin::new(&mut io).poll_flush(&mut cx).is_ready());
        assert!(matches!(
            Pin::new(&mut io).poll_write(&mut cx, b"x"),
            Poll::Ready(Ok(1))
        ));
        assert!(Pin::new(&mut io).poll_flush(&mut cx).is_pending());
        assert_eq!(wakes.0.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_full_buffer_is_written_without_waiting_for_a_flush() {
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut io = CoalescedFlush::new(Sink::default());
        let chunk = vec![7u8; BUFFER_LIMIT / 2 + 1];
        assert!(Pin::new(&mut io).poll_write(&mut cx, &chunk).is_ready());
        assert!(io.inner.writes.is_empty());
        // The second chunk would overflow: the first goes out, the second is held.
        assert!(Pin::new(&mut io).poll_write(&mut cx, &chunk).is_ready());
        assert_eq!(io.inner.writes.len(), 1);
        // One larger than the buffer goes straight through after what is held.
        let big = vec![9u8; BUFFER_LIMIT + 1];
        assert!(matches!(
            Pin::new(&mut io).poll_write(&mut cx, &big),
            Poll::Ready(Ok(n)) if n == big.len()
        ));
        assert_eq!(io.inner.writes.len(), 3);
        assert_eq!(io.inner.writes[2], big);
    }

    #[tokio::test]
    async fn bytes_arrive_intact_and_in_order_through_a_real_pipe() {
        let (client, server) = tokio::io::duplex(1 << 20);
        let mut writer = CoalescedFlush::new(client);
        let reader = tokio::spawn(async move {
            let mut server = server;
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            got
        });
        let mut expected = Vec::new();
        for i in 0..2_000u32 {
            let frame = vec![(i % 251) as u8; (i as usize * 37) % 3_000];
            writer.write_all(&frame).await.unwrap();
            expected.extend_from_slice(&frame);
            if i % 3 == 0 {
                writer.flush().await.unwrap();
            }
        }
        writer.shutdown().await.unwrap();
        drop(writer);
        assert_eq!(reader.await.unwrap(), expected);
        // Reading passes straight through.
        let (a, mut b) = tokio::io::duplex(64);
        let mut wrapped = CoalescedFlush::new(a);
        b.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        poll_fn(|cx| {
            let mut rb = ReadBuf::new(&mut got);
            Pin::new(&mut wrapped).poll_read(cx, &mut rb)
        })
        .await
        .unwrap();
        assert_eq!(&got, b"ping");
    }
}
