//! A gallery's feature values, held in memory or mapped from their file.
//!
//! Reading a large gallery into fresh memory costs more than the copy: every page
//! is zeroed and faulted in first, which on a virtual machine can cost a host
//! fault per page as well. A mapped file's pages are the page cache's own, so an
//! evaluation of a gallery that is in the page cache touches no new memory for it.

use std::ops::{Deref, DerefMut};

/// Row-major f32 features: owned, or a private (copy-on-write) map of the file.
///
/// A mapped file is read as it is on disk while it is mapped. This crate replaces
/// files by renaming a new one into place, which leaves a map intact; a file
/// truncated in place by another program while it is mapped is not supported.
pub enum FeatureData {
    Owned(Vec<f32>),
    /// A map that starts at the first value (4-aligned) and holds `len` values.
    Mapped {
        map: memmap2::MmapMut,
        len: usize,
    },
}

impl FeatureData {
    /// Maps `len` f32 values at byte `offset` of `file`, privately (writes stay in
    /// this process). `None` where the values cannot be used in place: a big-endian
    /// machine, values not aligned to 4 bytes, or a failed map.
    pub fn map(file: &std::fs::File, offset: u64, len: usize) -> Option<FeatureData> {
        if cfg!(target_endian = "big") || len == 0 {
            return None;
        }
        // SAFETY: the map is private, and the files this crate writes are replaced
        // by rename, never changed in place (see the type's documentation).
        let map = unsafe { memmap2::MmapOptions::new().offset(offset).len(4 * len).map_copy(file) }.ok()?;
        // memmap2 maps from the page below `offset` and points at `offset`: the
        // values are aligned exactly when `offset` is.
        (map.as_ptr() as usize)
            .is_multiple_of(4)
            .then_some(FeatureData::Mapped { map, len })
    }
}

impl Deref for FeatureData {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match self {
            FeatureData::Owned(v) => v,
            // SAFETY: the map holds `4 * len` bytes from a 4-aligned pointer, and
            // every bit pattern is a valid f32.
            FeatureData::Mapped { map, len } => unsafe { std::slice::from_raw_parts(map.as_ptr() as *const f32, *len) },
        }
    }
}

impl DerefMut for FeatureData {
    fn deref_mut(&mut self) -> &mut [f32] {
        match self {
            FeatureData::Owned(v) => v,
            // SAFETY: as for `deref`; the map is private, so writes touch no file.
            FeatureData::Mapped { map, len } => unsafe {
                std::slice::from_raw_parts_mut(map.as_mut_ptr() as *mut f32, *len)
            },
        }
    }
}

impl From<Vec<f32>> for FeatureData {
    fn from(v: Vec<f32>) -> Self {
        FeatureData::Owned(v)
    }
}

impl Clone for FeatureData {
    /// A copy in memory (of a map too).
    fn clone(&self) -> Self {
        FeatureData::Owned(self.to_vec())
    }
}

impl PartialEq for FeatureData {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl std::fmt::Debug for FeatureData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let how = match self {
            FeatureData::Owned(_) => "owned",
            FeatureData::Mapped { .. } => "mapped",
        };
        write!(f, "FeatureData({how}, {} values)", self.len())
    }
}
