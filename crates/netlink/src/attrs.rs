//! Netlink attributes (type-length-value, 4-byte aligned), nested or not.

use crate::NLA_F_NESTED;

/// A buffer of netlink attributes under construction.
#[derive(Debug, Default, Clone)]
pub struct Attrs {
    pub buf: Vec<u8>,
    nests: Vec<usize>,
}

impl Attrs {
    pub fn new() -> Attrs {
        Attrs {
            buf: Vec::with_capacity(256),
            nests: Vec::new(),
        }
    }

    /// Pads to the next 4-byte boundary.
    pub fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    /// One attribute of type `ty` holding `data`.
    pub fn attr(&mut self, ty: u16, data: &[u8]) {
        let len = (4 + data.len()) as u16;
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.pad();
    }

    /// A big-endian u32 attribute (nf_tables' byte order for numbers).
    pub fn u32(&mut self, ty: u16, v: u32) {
        self.attr(ty, &v.to_be_bytes());
    }

    /// A host-order u16 attribute (generic netlink's byte order for numbers).
    pub fn u16_ne(&mut self, ty: u16, v: u16) {
        self.attr(ty, &v.to_ne_bytes());
    }

    /// A host-order u32 attribute (generic netlink's byte order for numbers).
    pub fn u32_ne(&mut self, ty: u16, v: u32) {
        self.attr(ty, &v.to_ne_bytes());
    }

    /// A NUL-terminated string attribute.
    pub fn str(&mut self, ty: u16, s: &str) {
        let mut d = Vec::with_capacity(s.len() + 1);
        d.extend_from_slice(s.as_bytes());
        d.push(0);
        self.attr(ty, &d);
    }

    /// Opens a nested attribute of type `ty`; [`Attrs::end`] closes the innermost one.
    pub fn begin(&mut self, ty: u16) {
        self.nests.push(self.buf.len());
        self.buf.extend_from_slice(&[0, 0]);
        self.buf
            .extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
    }

    pub fn end(&mut self) {
        if let Some(start) = self.nests.pop() {
            let len = (self.buf.len() - start).min(u16::MAX as usize) as u16;
            self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        }
    }

    pub fn clear(&mut self) {
        self.buf.clear();
        self.nests.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_padded_and_nests_sized() {
        let mut a = Attrs::new();
        a.begin(1);
        a.str(2, "ab");
        a.u32(3, 7);
        a.end();
        let len = |at: usize| u16::from_ne_bytes([a.buf[at], a.buf[at + 1]]);
        let ty = |at: usize| u16::from_ne_bytes([a.buf[at + 2], a.buf[at + 3]]);
        assert_eq!(a.buf.len(), 4 + 8 + 8);
        assert_eq!((len(0), ty(0)), (20, 1 | NLA_F_NESTED));
        // "ab\0" is 7 bytes with its header, padded to 8.
        assert_eq!((len(4), ty(4)), (7, 2));
        assert_eq!(&a.buf[8..11], b"ab\0");
        assert_eq!((len(12), ty(12)), (8, 3));
        assert_eq!(&a.buf[16..20], &7u32.to_be_bytes());
    }
}
