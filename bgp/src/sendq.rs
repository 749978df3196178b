//! The send path's buffers: what the instance hands a session (`Batch`)
//! and what a session has queued for its socket (`OutQueue`).
//!
//! An update group encodes its UPDATEs once into one buffer; every member
//! gets slices of it (all of it but the part for its own paths), so a flush
//! is one channel message per session however many UPDATEs it carries, the
//! bytes waiting for a slow peer are shared with every other member rather
//! than copied per session, and the session hands the kernel its whole
//! queue in one vectored write.

use bytes::{Buf, Bytes};
use std::collections::VecDeque;
use std::io::IoSlice;

/// Encoded BGP messages for one session, in order: each part holds whole
/// messages.
#[derive(Clone, Debug, Default)]
pub struct Batch(Vec<Bytes>);

impl Batch {
    /// These messages, in one part.
    pub fn of(msgs: &[Vec<u8>]) -> Batch {
        let mut b = Batch::default();
        b.push(Bytes::from(msgs.concat()));
        b
    }

    /// Append a part (whole messages); an empty one is left out.
    pub fn push(&mut self, part: Bytes) {
        if !part.is_empty() {
            self.0.push(part);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The messages one by one, split at each header's length field.
    pub fn messages(&self) -> impl Iterator<Item = &[u8]> {
        self.0.iter().flat_map(|part| {
            let mut rest: &[u8] = part;
            std::iter::from_fn(move || {
                if rest.len() < 19 {
                    return None;
                }
                let len = (u16::from_be_bytes([rest[16], rest[17]]) as usize).clamp(19, rest.len());
                let (m, r) = rest.split_at(len);
                rest = r;
                Some(m)
            })
        })
    }
}

/// How many parts one write hands the kernel at most.
pub const WRITE_PARTS: usize = 32;

/// Bytes queued for the peer and not yet taken by the kernel, as shared
/// parts in order.
#[derive(Debug, Default)]
pub struct OutQueue {
    parts: VecDeque<Bytes>,
    len: usize,
}

impl OutQueue {
    pub fn push(&mut self, part: Bytes) {
        if !part.is_empty() {
            self.len += part.len();
            self.parts.push_back(part);
        }
    }

    pub fn extend(&mut self, batch: Batch) {
        batch.0.into_iter().for_each(|p| self.push(p));
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Queued bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn clear(&mut self) {
        // A new deque: a long backlog's slot array is not kept.
        *self = OutQueue::default();
    }

    /// The first parts, for a vectored write; how many were filled in.
    pub fn slices<'a>(&'a self, iov: &mut [IoSlice<'a>]) -> usize {
        let mut n = 0;
        for (slot, part) in iov.iter_mut().zip(&self.parts) {
            *slot = IoSlice::new(part);
            n += 1;
        }
        n
    }

    /// The kernel took `n` bytes from the front.
    pub fn advance(&mut self, mut n: usize) {
        self.len -= n.min(self.len);
        while n > 0 {
            let Some(front) = self.parts.front_mut() else {
                return;
            };
            if n < front.len() {
                front.advance(n);
                return;
            }
            n -= front.len();
            self.parts.pop_front();
        }
        if self.parts.is_empty() && self.parts.capacity() > 64 {
            self.parts = VecDeque::new();
        }
    }

    /// The parts, to write out one after another.
    pub fn parts(&self) -> impl Iterator<Item = &Bytes> {
        self.parts.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(len: u16, fill: u8) -> Vec<u8> {
        let mut m = vec![0xff; 16];
        m.extend_from_slice(&len.to_be_bytes());
        m.push(2);
        m.resize(len as usize, fill);
        m
    }

    #[test]
    fn a_batch_splits_back_into_its_messages() {
        let mut b = Batch::of(&[msg(23, 1), msg(19, 2)]);
        b.push(Bytes::new());
        b.push(Bytes::from(msg(30, 3)));
        let lens: Vec<usize> = b.messages().map(|m| m.len()).collect();
        assert_eq!(lens, [23, 19, 30]);
    }

    #[test]
    fn the_queue_hands_out_parts_in_order_and_advances_across_them() {
        let mut q = OutQueue::default();
        q.push(Bytes::from_static(b"abc"));
        q.push(Bytes::from_static(b"defg"));
        q.push(Bytes::new());
        assert_eq!(q.len(), 7);
        let mut iov = [IoSlice::new(&[]); 4];
        assert_eq!(q.slices(&mut iov), 2);
        q.advance(4);
        assert_eq!(q.len(), 3);
        let rest: Vec<u8> = q.parts().flat_map(|p| p.to_vec()).collect();
        assert_eq!(rest, b"efg");
        q.advance(3);
        assert!(q.is_empty());
        assert_eq!(q.parts().count(), 0);
    }
}
