//! What a disk backup reads from: the guest-visible content of a disk, chunk by chunk. The
//! repository does not care where it comes from (an image file, a block device, memory).

/// What `ChunkSource::read_chunk` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkKind {
    /// The whole chunk reads as zeros (known without reading it); the buffer is left empty.
    Zero,
    /// The buffer holds the chunk. It may still be all zeros: the backup checks.
    Data,
}

/// The content of one disk. `Sync`: a backup reads different chunks from several threads at
/// once.
pub trait ChunkSource: Sync {
    /// Why a read failed; carried as `RepoError::Source`.
    type Error: std::error::Error + Send + Sync + 'static;

    /// The size of the disk in bytes, as the guest sees it.
    fn virtual_size(&self) -> u64;

    /// Reads chunk `index` (bytes `index * chunk_size ..`, `chunk_size` of them; the last one
    /// may be shorter) into `buf`, replacing its content. For `ChunkKind::Data`, `buf` holds
    /// exactly the chunk's bytes.
    fn read_chunk(
        &self,
        index: u64,
        chunk_size: u64,
        buf: &mut Vec<u8>,
    ) -> Result<ChunkKind, Self::Error>;
}

#[cfg(test)]
pub(crate) mod memory {
    //! A disk held in memory, for tests.

    use super::{ChunkKind, ChunkSource};

    /// `data` is the disk; chunks that lie entirely in one of the `zero` ranges (byte offsets,
    /// end excluded) report `ChunkKind::Zero` without being read, as an image's allocation map
    /// would tell. The bytes there must be zeros.
    pub struct MemorySource {
        pub data: Vec<u8>,
        pub zero: Vec<std::ops::Range<u64>>,
    }

    impl ChunkSource for MemorySource {
        type Error = std::io::Error;

        fn virtual_size(&self) -> u64 {
            self.data.len() as u64
        }

        fn read_chunk(
            &self,
            index: u64,
            chunk_size: u64,
            buf: &mut Vec<u8>,
        ) -> Result<ChunkKind, std::io::Error> {
            let start = index * chunk_size;
            let end = (start + chunk_size).min(self.virtual_size());
            if start >= end {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("chunk {index} is past the end"),
                ));
            }
            buf.clear();
            if self.zero.iter().any(|z| z.start <= start && end <= z.end) {
                return Ok(ChunkKind::Zero);
            }
            buf.extend_from_slice(&self.data[start as usize..end as usize]);
            Ok(ChunkKind::Data)
        }
    }
}
