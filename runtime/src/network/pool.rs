//! Per-thread pools of I/O buffers, so an idle connection holds no read or write buffer.
//!
//! A connection borrows a read buffer only for the duration of one `poll_read` that returns
//! bytes, and keeps it only until those bytes are decoded; the writer borrows its coalescing
//! buffer for one write. Every worker is one thread, so the pools need no locking, and a
//! thread's pool never holds more than [`POOL_MAX`] buffers.

use std::cell::RefCell;

/// Size of a socket read buffer.
pub(super) const READ_BUFFER_BYTES: usize = 8 * 1024;
/// Write buffers that grew beyond this are freed instead of pooled.
pub(super) const KEEP_WRITE_BUFFER_BYTES: usize = 16 * 1024;
/// Buffers kept per thread and pool (at most 64 x 16 KiB + 64 x 8 KiB per worker).
const POOL_MAX: usize = 64;

thread_local! {
    static READ: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
    static WRITE: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// A zeroed read buffer of [`READ_BUFFER_BYTES`].
pub(super) fn take_read() -> Vec<u8> {
    READ.with(|p| p.borrow_mut().pop())
        .unwrap_or_else(|| vec![0; READ_BUFFER_BYTES])
}

/// Returns a read buffer to this thread's pool.
pub(super) fn give_read(buf: Vec<u8>) {
    if buf.len() != READ_BUFFER_BYTES {
        return;
    }
    READ.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < POOL_MAX {
            p.push(buf);
        }
    });
}

/// An empty write buffer (with whatever capacity a previous writer left it).
pub(super) fn take_write() -> Vec<u8> {
    WRITE.with(|p| p.borrow_mut().pop()).unwrap_or_default()
}

/// Returns a write buffer to this thread's pool (cleared; freed if it grew large).
pub(super) fn give_write(mut buf: Vec<u8>) {
    if buf.capacity() == 0 || buf.capacity() > KEEP_WRITE_BUFFER_BYTES {
        return;
    }
    buf.clear();
    WRITE.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < POOL_MAX {
            p.push(buf);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_and_bounded() {
        let a = take_read();
        assert_eq!(a.len(), READ_BUFFER_BYTES);
        let ptr = a.as_ptr();
        give_read(a);
        let b = take_read();
        assert_eq!(b.as_ptr(), ptr, "the pooled buffer is handed out again");
        give_read(b);
        give_read(vec![0; 10]); // wrong size: dropped, not pooled
        assert_eq!(take_read().len(), READ_BUFFER_BYTES);

        let mut w = take_write();
        w.extend_from_slice(b"frame");
        give_write(w);
        assert!(take_write().is_empty(), "write buffers come back cleared");
        give_write(Vec::with_capacity(KEEP_WRITE_BUFFER_BYTES + 1));
        for _ in 0..POOL_MAX * 2 {
            give_read(vec![0; READ_BUFFER_BYTES]);
        }
        assert!(READ.with(|p| p.borrow().len()) <= POOL_MAX);
        assert!(WRITE.with(|p| p
            .borrow()
            .iter()
            .all(|b| b.capacity() <= KEEP_WRITE_BUFFER_BYTES)));
    }
}
