//! Memory for the repacked weight matrices, backed by transparent huge
//! pages where the OS offers them.
//!
//! A decode step streams every weight once, and with 4 KiB pages that is a
//! TLB miss every 4 KiB (24,000 per SmolLM2 token, 240,000 per Qwen 1.5B
//! token): the kernels were measured 10–20% faster on 2 MiB pages (the
//! same binary with glibc's `glibc.malloc.hugetlb=1`, decode tok/s,
//! SmolLM2 / Gemma 3 / Qwen 0.5B). So the matrices are carved, in order,
//! out of 64 MiB anonymous mappings advised `MADV_HUGEPAGE` (a larger matrix
//! gets a mapping of its own); small matrices share huge pages that way,
//! which one mapping each would not give them. Only the touched part of a
//! mapping is resident, so the slack costs address space, not memory. A
//! chunk is unmapped when its last matrix is dropped. Where mapping fails
//! (or elsewhere than Linux, without the advice) the words are an ordinary
//! `Vec`.

use std::sync::{Arc, Mutex};

/// The huge page size the mappings are aligned to.
const HUGE_PAGE: usize = 2 << 20;
/// Bytes per shared mapping.
const CHUNK: usize = 64 << 20;

/// One anonymous mapping, 2 MiB-aligned from `base`.
struct Chunk {
    map: memmap2::MmapMut,
    /// Offset of the first 2 MiB boundary in `map`.
    base: usize,
}

impl Chunk {
    /// A mapping with `bytes` usable from a 2 MiB boundary, advised for huge
    /// pages (best effort: the advice fails where THP is off, harmlessly).
    fn new(bytes: usize) -> Option<Chunk> {
        let map = memmap2::MmapMut::map_anon(bytes + HUGE_PAGE).ok()?;
        let addr = map.as_ptr() as usize;
        let base = addr.next_multiple_of(HUGE_PAGE) - addr;
        #[cfg(target_os = "linux")]
        let _ = map.advise_range(memmap2::Advice::HugePage, base, bytes);
        Some(Chunk { map, base })
    }
}

/// The chunk being filled and the bytes of it handed out.
static CURRENT: Mutex<Option<(Arc<Chunk>, usize)>> = Mutex::new(None);

/// Zeroed `u64` words for one matrix, owned.
pub struct WeightWords {
    storage: Storage,
}

enum Storage {
    /// `len` words at byte `offset` of `chunk`, no other `WeightWords`
    /// overlapping them.
    Mapped {
        chunk: Arc<Chunk>,
        offset: usize,
        len: usize,
    },
    Heap(Vec<u64>),
}

// SAFETY: a mapped WeightWords is the only handle to its words (the arena
// hands each range out once); the chunk itself is never accessed otherwise.
unsafe impl Send for WeightWords {}
unsafe impl Sync for WeightWords {}

impl WeightWords {
    /// `len` zeroed words.
    pub fn zeroed(len: usize) -> WeightWords {
        let bytes = len * 8;
        let storage = Self::mapped(bytes)
            .map_or_else(|| Storage::Heap(vec![0; len]), |(chunk, offset)| Storage::Mapped { chunk, offset, len });
        WeightWords { storage }
    }

    /// A range of `bytes` (rounded up to 64) from the current chunk, a new
    /// one, or a mapping of its own when larger than a chunk.
    fn mapped(bytes: usize) -> Option<(Arc<Chunk>, usize)> {
        if bytes == 0 {
            return None;
        }
        if bytes > CHUNK / 2 {
            let chunk = Arc::new(Chunk::new(bytes)?);
            let base = chunk.base;
            return Some((chunk, base));
        }
        let bytes = bytes.next_multiple_of(64);
        let mut current = CURRENT.lock().unwrap_or_else(|e| e.into_inner());
        if current.as_ref().is_none_or(|(_, used)| used + bytes > CHUNK) {
            *current = Some((Arc::new(Chunk::new(CHUNK)?), 0));
        }
        let (chunk, used) = current.as_mut().expect("set above");
        let offset = chunk.base + *used;
        *used += bytes;
        Some((chunk.clone(), offset))
    }

    pub fn as_slice(&self) -> &[u64] {
        match &self.storage {
            // SAFETY: the range lies inside the mapping (checked by the
            // arena's arithmetic), is 8-byte aligned (64-byte offsets from a
            // 2 MiB boundary), and the chunk outlives `self`.
            Storage::Mapped { chunk, offset, len } => unsafe {
                std::slice::from_raw_parts(chunk.map.as_ptr().add(*offset).cast(), *len)
            },
            Storage::Heap(v) => v,
        }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u64] {
        match &mut self.storage {
            // SAFETY: as in `as_slice`, and no other handle reaches these
            // words, so the unique borrow of `self` makes this one unique.
            Storage::Mapped { chunk, offset, len } => unsafe {
                std::slice::from_raw_parts_mut(chunk.map.as_ptr().add(*offset).cast_mut().cast(), *len)
            },
            Storage::Heap(v) => v,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_zeroed_separate_and_writable() {
        let mut small: Vec<WeightWords> = (1..200).map(|n| WeightWords::zeroed(n * 97)).collect();
        for (i, w) in small.iter_mut().enumerate() {
            assert!(w.as_slice().iter().all(|&x| x == 0));
            w.as_mut_slice().fill(i as u64 + 1);
        }
        for (i, w) in small.iter().enumerate() {
            assert!(w.as_slice().iter().all(|&x| x == i as u64 + 1), "buffer {i} was overwritten");
        }
        let mut big = WeightWords::zeroed((CHUNK / 8) + 5);
        big.as_mut_slice()[CHUNK / 8 + 4] = 7;
        assert_eq!(big.as_slice().len(), CHUNK / 8 + 5);
        assert_eq!(WeightWords::zeroed(0).as_slice().len(), 0);
    }
}
