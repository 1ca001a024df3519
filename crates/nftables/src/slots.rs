//! Slot ranges in the shared `endpoint-slots` map: each service (or local) chain owns a
//! contiguous range [base, base + capacity) and its rule picks `numgen random mod N offset
//! base`. Capacities are powers of two, so a service can grow without moving until it
//! doubles, and freed ranges are reused.

use std::collections::{BTreeMap, HashMap};

#[derive(Debug, Default, Clone)]
pub struct SlotAllocator {
    next: u32,
    free: BTreeMap<u32, Vec<u32>>,
    owned: HashMap<String, (u32, u32)>,
}

impl SlotAllocator {
    /// The base of `owner`'s range, (re)allocating when `n` exceeds its capacity.
    pub fn assign(&mut self, owner: &str, n: u32) -> u32 {
        let cap = n.max(1).next_power_of_two();
        if let Some((base, have)) = self.owned.get(owner).copied() {
            if have >= cap {
                return base;
            }
            self.free.entry(have).or_default().push(base);
        }
        let base = match self.free.get_mut(&cap).and_then(|v| v.pop()) {
            Some(b) => b,
            None => {
                let b = self.next;
                self.next += cap;
                b
            }
        };
        self.owned.insert(owner.to_string(), (base, cap));
        base
    }

    /// Frees the range of an owner that no longer exists.
    pub fn release(&mut self, owner: &str) {
        if let Some((base, cap)) = self.owned.remove(owner) {
            self.free.entry(cap).or_default().push(base);
        }
    }

    pub fn owners(&self) -> impl Iterator<Item = &String> {
        self.owned.keys()
    }

    pub fn clear(&mut self) {
        *self = SlotAllocator::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_grow_and_are_reused() {
        let mut s = SlotAllocator::default();
        let a = s.assign("a", 3); // cap 4
        let b = s.assign("b", 1); // cap 1
        assert_eq!((a, b), (0, 4));
        assert_eq!(s.assign("a", 4), 0, "fits its capacity");
        let a2 = s.assign("a", 5); // cap 8, moves
        assert_eq!(a2, 5);
        assert_eq!(s.assign("c", 4), 0, "reuses a's old range");
        s.release("b");
        assert_eq!(s.assign("d", 1), 4);
    }
}
