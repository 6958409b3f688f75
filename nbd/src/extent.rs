//! Extents of the `base:allocation` metadata context: which parts of an export hold data, and which are
//! holes or read as zeroes.

/// A run of bytes with one allocation status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
    /// `NBD_STATE_HOLE`: not allocated in the backing storage.
    pub hole: bool,
    /// `NBD_STATE_ZERO`: reads as zeroes.
    pub zero: bool,
}

impl Extent {
    /// The first byte after the extent.
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.len)
    }
}

/// Appends `next`, merging it into the last extent when they touch and share a status.
pub(crate) fn push_merged(extents: &mut Vec<Extent>, next: Extent) {
    if let Some(last) = extents.last_mut() {
        if last.end() == next.offset && last.hole == next.hole && last.zero == next.zero {
            last.len += next.len;
            return;
        }
    }
    extents.push(next);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn touching_extents_with_the_same_status_merge() {
        let e = |offset, len, hole, zero| Extent {
            offset,
            len,
            hole,
            zero,
        };
        let mut v = Vec::new();
        push_merged(&mut v, e(0, 10, false, false));
        push_merged(&mut v, e(10, 5, false, false));
        push_merged(&mut v, e(15, 5, true, true));
        push_merged(&mut v, e(20, 5, true, true));
        push_merged(&mut v, e(30, 5, true, true));
        assert_eq!(
            v,
            vec![
                e(0, 15, false, false),
                e(15, 10, true, true),
                e(30, 5, true, true)
            ]
        );
    }
}
