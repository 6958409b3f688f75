//! Extents of metadata contexts: [`Extent`] for `base:allocation` (which parts of an export hold data,
//! and which are holes or read as zeroes), [`ContextExtent`] with the raw flags of any other context
//! (a dirty bitmap's: changed or not).

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

/// A run of bytes with one status in a metadata context other than `base:allocation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContextExtent {
    pub offset: u64,
    pub len: u64,
    /// The context's flags for the run, as the server sent them.
    pub flags: u32,
}

impl ContextExtent {
    /// The first byte after the extent.
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.len)
    }

    /// For a `qemu:dirty-bitmap:NAME` context: whether the run changed (`NBD_STATE_DIRTY`).
    pub fn dirty(&self) -> bool {
        self.flags & crate::proto::STATE_DIRTY != 0
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
