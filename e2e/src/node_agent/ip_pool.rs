//! Hands each pod its own loopback address. All of 127.0.0.0/8 routes to `lo`
//! on Linux, so a process can bind 127.1.x.y without any network setup, and
//! two pods can listen on the same port.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

#[derive(Debug)]
pub struct IpPool {
    second_octet: u8,
    in_use: BTreeSet<u16>,
    next: u16,
}

impl IpPool {
    /// Addresses 127.<second_octet>.0.2 to 127.<second_octet>.255.254.
    pub fn new(second_octet: u8) -> Self {
        IpPool {
            second_octet,
            in_use: BTreeSet::new(),
            next: FIRST,
        }
    }

    /// The next free address, round robin so a freed address is not reused at
    /// once (a late connection to a deleted pod must not reach its successor).
    pub fn allocate(&mut self) -> Option<Ipv4Addr> {
        for _ in FIRST..=LAST {
            let candidate = self.next;
            self.next = if self.next >= LAST {
                FIRST
            } else {
                self.next + 1
            };
            if self.in_use.insert(candidate) {
                return Some(self.address(candidate));
            }
        }
        None
    }

    pub fn release(&mut self, ip: Ipv4Addr) {
        let [_, second, hi, lo] = ip.octets();
        if second == self.second_octet {
            self.in_use.remove(&u16::from_be_bytes([hi, lo]));
        }
    }

    fn address(&self, n: u16) -> Ipv4Addr {
        let [hi, lo] = n.to_be_bytes();
        Ipv4Addr::new(127, self.second_octet, hi, lo)
    }
}

const FIRST: u16 = 2;
const LAST: u16 = u16::MAX - 1;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_distinct_addresses_and_does_not_reuse_at_once() {
        let mut pool = IpPool::new(1);
        let a = pool.allocate().unwrap();
        let b = pool.allocate().unwrap();
        assert_eq!(a, Ipv4Addr::new(127, 1, 0, 2));
        assert_eq!(b, Ipv4Addr::new(127, 1, 0, 3));
        pool.release(a);
        assert_eq!(pool.allocate().unwrap(), Ipv4Addr::new(127, 1, 0, 4));
    }

    #[test]
    fn wraps_around_to_freed_addresses() {
        let mut pool = IpPool::new(1);
        let all: Vec<_> = (FIRST..=LAST).map(|_| pool.allocate().unwrap()).collect();
        assert!(pool.allocate().is_none());
        pool.release(all[10]);
        assert_eq!(pool.allocate(), Some(all[10]));
    }
}
