//! Disk images through `qemu-img` (never through a shell): their size, their allocation map,
//! and a reader of their guest-visible content that reads data extents straight from the image
//! file with positional reads (no conversion, zero regions never read).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("qemu-img {args} failed: {detail}")]
    QemuImg { args: String, detail: String },
    #[error("cannot parse qemu-img output for {}", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot read {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {why}", path.display())]
    Unsupported { path: PathBuf, why: String },
    #[error("{} is in use: {why}", path.display())]
    InUse { path: PathBuf, why: String },
    /// A stop signal came (`interrupt`): the reader stops at the next chunk.
    #[error("interrupted")]
    Interrupted,
}

type Result<T> = std::result::Result<T, ImageError>;

fn qemu_img(args: &[&str]) -> Result<Vec<u8>> {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .map_err(|e| ImageError::QemuImg {
            args: args.join(" "),
            detail: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(ImageError::QemuImg {
            args: args.join(" "),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out.stdout)
}

/// Creates image `path` (`qemu-img create`) in `format`, of `size` bytes, on top of `backing`
/// (a file or an NBD URI, and its format) when one is given; a backing is not opened (`-u`).
/// Over an existing file, qemu-img keeps that file's mode.
pub fn create(path: &Path, format: &str, size: u64, backing: Option<(&str, &str)>) -> Result<()> {
    let p = path.to_str().ok_or_else(|| ImageError::Unsupported {
        path: path.to_path_buf(),
        why: "its path is not UTF-8".into(),
    })?;
    let size = size.to_string();
    let mut args = vec!["create", "-q", "-f", format];
    if let Some((file, file_format)) = backing {
        args.extend(["-F", file_format, "-u", "-b", file]);
    }
    args.extend([p, size.as_str()]);
    qemu_img(&args).map(|_| ())
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ImageInfo {
    pub format: String,
    #[serde(rename = "virtual-size")]
    pub virtual_size: u64,
    #[serde(rename = "actual-size", default)]
    pub actual_size: u64,
    #[serde(rename = "backing-filename", default)]
    pub backing_file: Option<String>,
    /// The backing file's path as QEMU resolves it (absolute).
    #[serde(rename = "full-backing-filename", default)]
    pub full_backing_file: Option<String>,
}

/// `qemu-img info` of an image; `-U` so that it works while QEMU holds the image.
pub fn info(path: &Path) -> Result<ImageInfo> {
    let p = path.to_string_lossy();
    let out = qemu_img(&["info", "--output=json", "-U", &p])?;
    serde_json::from_slice(&out).map_err(|source| ImageError::Parse {
        path: path.to_path_buf(),
        source,
    })
}

/// Creates an empty qcow2 overlay at `overlay` on top of `image` (format `format`, `size`
/// bytes). `-u`: the image is in use by QEMU, so its header is not opened for the size.
///
/// The overlay holds the guest's writes until the commit back, so it is no more open than
/// the image it stands in for: the file is made first, exclusively (never through a symlink,
/// never over an existing file), mode 0600, then given the image's owner and permission bits
/// as they are now (for a running libvirt VM with dynamic ownership: QEMU's user, which is
/// what QEMU needs to open it), and only then does `qemu-img` write the qcow2 header into it.
/// When the owner cannot be given (not root), the overlay stays ours and 0600.
pub fn create_overlay(overlay: &Path, image: &Path, format: &str, size: u64) -> Result<()> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ImageError::Io { path, source }
    };
    let meta = std::fs::metadata(image).map_err(io(image))?;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(overlay)
        .map_err(io(overlay))?;
    let owned = match std::os::unix::fs::fchown(&file, Some(meta.uid()), Some(meta.gid())) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => Err(()),
        Err(e) => {
            drop(file);
            let _ = std::fs::remove_file(overlay);
            return Err(io(overlay)(e));
        }
    };
    if owned.is_ok() {
        if let Err(e) = file.set_permissions(std::fs::Permissions::from_mode(meta.mode() & 0o777)) {
            drop(file);
            let _ = std::fs::remove_file(overlay);
            return Err(io(overlay)(e));
        }
    }
    drop(file);
    let (ov, img) = (overlay.to_string_lossy(), image.to_string_lossy());
    qemu_img(&[
        "create",
        "-q",
        "-u",
        "-f",
        "qcow2",
        "-F",
        format,
        "-b",
        &img,
        &ov,
        &size.to_string(),
    ])
    .map(|_| ())
    .inspect_err(|_| {
        let _ = std::fs::remove_file(overlay);
    })
}

/// Gives the file `file` the owner and permission bits of `like`, as they are now (for a
/// restored image: the image it replaces, read while the VM is off, so the owner libvirt's
/// dynamic ownership puts back at shutdown rather than QEMU's user). Without the right to
/// change the owner (not root), the file stays ours and keeps its mode.
pub fn take_owner_and_mode(file: &Path, like: &std::fs::Metadata) -> Result<()> {
    let io = |source| ImageError::Io {
        path: file.to_path_buf(),
        source,
    };
    match std::os::unix::fs::chown(file, Some(like.uid()), Some(like.gid())) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => return Ok(()),
        Err(e) => return Err(io(e)),
    }
    std::fs::set_permissions(file, std::fs::Permissions::from_mode(like.mode() & 0o777)).map_err(io)
}

/// Keeps QEMU from opening an image for writing while it is read: QEMU's own image locking
/// refuses the write permission while another process holds a shared lock on byte 201
/// ("write is not shared"). Released when dropped.
pub struct NoWriters {
    _file: File,
}

fn ofd_lock(kind: libc::c_int, byte: i64) -> libc::flock {
    libc::flock {
        l_type: kind as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: byte,
        l_len: 1,
        l_pid: 0,
    }
}

/// Takes the lock of `NoWriters` on an image; `ImageError::InUse` when a process (a running
/// QEMU) already has the image open for writing, which it shows by a lock on byte 101.
pub fn forbid_writers(path: &Path) -> Result<NoWriters> {
    use nix::fcntl::{fcntl, FcntlArg};
    let file = File::open(path).map_err(|source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let busy = |why: String| ImageError::InUse {
        path: path.to_path_buf(),
        why,
    };
    fcntl(
        file.as_raw_fd(),
        FcntlArg::F_OFD_SETLK(&ofd_lock(libc::F_RDLCK, 201)),
    )
    .map_err(|e| busy(e.to_string()))?;
    let mut probe = ofd_lock(libc::F_WRLCK, 101);
    fcntl(file.as_raw_fd(), FcntlArg::F_OFD_GETLK(&mut probe)).map_err(|e| busy(e.to_string()))?;
    if probe.l_type != libc::F_UNLCK as libc::c_short {
        return Err(busy("another process has it open for writing".into()));
    }
    Ok(NoWriters { _file: file })
}

/// `qemu-img bitmap --remove`: removes the persistent dirty bitmap `name` from the qcow2
/// image at `image`, which must not be in use (QEMU's image lock refuses it otherwise).
pub fn remove_bitmap(image: &Path, name: &str) -> Result<()> {
    qemu_img(&[
        "bitmap",
        "--remove",
        "-f",
        "qcow2",
        &image.to_string_lossy(),
        name,
    ])
    .map(|_| ())
}

/// `qemu-img commit -d`: writes an overlay's data into its backing image (the overlay is
/// left as it is, for the caller to delete). The image must not be in use.
pub fn commit(overlay: &Path) -> Result<()> {
    qemu_img(&["commit", "-q", "-d", &overlay.to_string_lossy()]).map(|_| ())
}

/// `qemu-img convert` of `src` (format `src_format`) into a new image `dst` of `dst_format`,
/// with out-of-order writes.
pub fn convert(src: &Path, src_format: &str, dst: &Path, dst_format: &str) -> Result<()> {
    qemu_img(&[
        "convert",
        "-q",
        "-W",
        "-f",
        src_format,
        "-O",
        dst_format,
        &src.to_string_lossy(),
        &dst.to_string_lossy(),
    ])
    .map(|_| ())
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Extent {
    pub start: u64,
    pub length: u64,
    #[serde(default)]
    pub depth: u64,
    #[serde(default)]
    pub zero: bool,
    #[serde(default)]
    pub data: bool,
    #[serde(default)]
    pub offset: Option<u64>,
}

/// `qemu-img map` of an image: which ranges hold data, and where in the file.
pub fn map(path: &Path, format: &str) -> Result<Vec<Extent>> {
    let p = path.to_string_lossy();
    let out = qemu_img(&["map", "--output=json", "-U", "-f", format, &p])?;
    serde_json::from_slice(&out).map_err(|source| ImageError::Parse {
        path: path.to_path_buf(),
        source,
    })
}

/// What `ImageReader::read_chunk` found: `Zero` when the map says the whole chunk reads as
/// zeros (nothing was read).
pub use crate::repository::source::ChunkKind;

/// Reads the guest-visible content of a qcow2 or raw image whose data lies in the file itself
/// (no backing file, no compressed or encrypted clusters). `Sync`: threads may read
/// different chunks at once.
pub struct ImageReader {
    path: PathBuf,
    file: File,
    extents: Vec<Extent>,
    virtual_size: u64,
}

impl ImageReader {
    pub fn open(path: &Path, format: &str) -> Result<ImageReader> {
        let extents = map(path, format)?;
        for e in &extents {
            if e.data && (e.depth > 0 || e.offset.is_none()) {
                return Err(ImageError::Unsupported {
                    path: path.to_path_buf(),
                    why: format!(
                        "data at {}+{} is {} (backing files, compressed and encrypted clusters \
                         are not supported)",
                        e.start,
                        e.length,
                        if e.depth > 0 {
                            "in a backing file"
                        } else {
                            "not at a plain file offset"
                        }
                    ),
                });
            }
        }
        let virtual_size = extents.last().map(|e| e.start + e.length).unwrap_or(0);
        let file = File::open(path).map_err(|source| ImageError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(ImageReader {
            path: path.to_path_buf(),
            file,
            extents,
            virtual_size,
        })
    }

    pub fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    /// Reads chunk `index` (of `chunk_size` bytes; the last one may be shorter) into `buf`.
    /// After a stop signal (`interrupt::requested`) every read fails with
    /// `ImageError::Interrupted`, so that a copy stops at its next chunk, however large the
    /// disk.
    pub fn read_chunk(&self, index: u64, chunk_size: u64, buf: &mut Vec<u8>) -> Result<ChunkKind> {
        if crate::interrupt::requested() {
            return Err(ImageError::Interrupted);
        }
        let start = index * chunk_size;
        let end = (start + chunk_size).min(self.virtual_size);
        let len = end.saturating_sub(start) as usize;
        // The extents overlapping [start, end).
        let first = self
            .extents
            .partition_point(|e| e.start + e.length <= start);
        let overlapping = self.extents[first..].iter().take_while(|e| e.start < end);
        let mut any_data = false;
        for e in overlapping.clone() {
            if e.data && !e.zero {
                any_data = true;
                break;
            }
        }
        if !any_data {
            buf.clear();
            return Ok(ChunkKind::Zero);
        }
        buf.clear();
        buf.resize(len, 0);
        for e in overlapping {
            if !e.data || e.zero {
                continue;
            }
            let s = e.start.max(start);
            let t = (e.start + e.length).min(end);
            let file_off = e.offset.unwrap_or(0) + (s - e.start);
            let dst = &mut buf[(s - start) as usize..(t - start) as usize];
            self.file
                .read_exact_at(dst, file_off)
                .map_err(|source| ImageError::Io {
                    path: self.path.clone(),
                    source,
                })?;
        }
        Ok(ChunkKind::Data)
    }
}

/// What a backup reads a disk through.
impl crate::repository::source::ChunkSource for ImageReader {
    type Error = ImageError;

    fn virtual_size(&self) -> u64 {
        ImageReader::virtual_size(self)
    }

    fn read_chunk(&self, index: u64, chunk_size: u64, buf: &mut Vec<u8>) -> Result<ChunkKind> {
        ImageReader::read_chunk(self, index, chunk_size, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_overlay_gets_the_images_owner_and_mode_and_never_follows_a_planted_symlink() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let d = tempfile::tempdir().unwrap();
        let image = d.path().join("disk.qcow2");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            &image.to_string_lossy(),
            "1M",
        ])
        .unwrap();
        std::fs::set_permissions(&image, std::fs::Permissions::from_mode(0o640)).unwrap();
        let root = nix::unistd::geteuid().is_root();
        if root {
            std::os::unix::fs::chown(&image, Some(4242), Some(4243)).unwrap();
        }
        let ov = d.path().join("disk.vmbackup-x.qcow2");
        create_overlay(&ov, &image, "qcow2", 1 << 20).unwrap();
        let m = std::fs::metadata(&ov).unwrap();
        let backing = info(&ov).unwrap().backing_file;
        assert_eq!(backing.as_deref(), Some(&*image.to_string_lossy()));
        if root {
            assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (4242, 4243, 0o640));
        } else {
            assert_eq!(m.mode() & 0o7777, 0o600);
        }
        // A symlink planted where the overlay goes is not followed, and its target untouched.
        let victim = d.path().join("victim");
        std::fs::write(&victim, b"mine").unwrap();
        let planted = d.path().join("disk.vmbackup-y.qcow2");
        std::os::unix::fs::symlink(&victim, &planted).unwrap();
        assert!(create_overlay(&planted, &image, "qcow2", 1 << 20).is_err());
        assert_eq!(std::fs::read(&victim).unwrap(), b"mine");
        assert!(std::fs::symlink_metadata(&planted)
            .unwrap()
            .file_type()
            .is_symlink());
    }

    fn run(args: &[&str]) {
        let st = Command::new(args[0]).args(&args[1..]).status().unwrap();
        assert!(st.success(), "{args:?}");
    }

    fn content(reader: &ImageReader, chunk: u64) -> Vec<u8> {
        let mut all = Vec::new();
        let mut buf = Vec::new();
        let n = reader.virtual_size().div_ceil(chunk);
        for i in 0..n {
            let len = (reader.virtual_size() - i * chunk).min(chunk) as usize;
            match reader.read_chunk(i, chunk, &mut buf).unwrap() {
                ChunkKind::Zero => all.extend(std::iter::repeat_n(0u8, len)),
                ChunkKind::Data => {
                    assert_eq!(buf.len(), len);
                    all.extend_from_slice(&buf)
                }
            }
        }
        all
    }

    #[test]
    fn reads_what_qemu_img_convert_reads() {
        let dir = tempfile::tempdir().unwrap();
        for fmt in ["qcow2", "raw"] {
            let img = dir.path().join(format!("a.{fmt}"));
            let p = img.to_str().unwrap();
            // 5 MiB + 512 bytes: not a multiple of the chunk size.
            run(&["qemu-img", "create", "-q", "-f", fmt, p, "5243392"]);
            run(&["qemu-io", "-f", fmt, "-c", "write -P 0xab 1M 64k", p]);
            run(&["qemu-io", "-f", fmt, "-c", "write -P 0x11 4M 1M", p]);
            run(&["qemu-io", "-f", fmt, "-c", "write -z 4M 4k", p]);
            run(&["qemu-io", "-f", fmt, "-c", "write -P 0x7f 5242880 512", p]);
            let raw = dir.path().join(format!("a-{fmt}.out"));
            run(&[
                "qemu-img",
                "convert",
                "-f",
                fmt,
                "-O",
                "raw",
                p,
                raw.to_str().unwrap(),
            ]);
            let expect = std::fs::read(&raw).unwrap();
            let reader = ImageReader::open(&img, fmt).unwrap();
            assert_eq!(reader.virtual_size(), 5243392);
            for chunk in [1 << 20, 3 << 20, 4 << 20] {
                assert!(content(&reader, chunk) == expect, "{fmt} chunk {chunk}");
            }
            let i = info(&img).unwrap();
            assert_eq!((i.format.as_str(), i.virtual_size), (fmt, 5243392));
        }
    }

    #[test]
    fn a_backup_through_the_reader_restores_what_qemu_img_convert_reads() {
        use crate::repository::disk::{backup_disk, restore_disk};
        let d = tempfile::tempdir().unwrap();
        let repo = crate::repository::Repository::open(&d.path().join("repo")).unwrap();
        let img = d.path().join("a.qcow2");
        let p = img.to_str().unwrap();
        run(&["qemu-img", "create", "-q", "-f", "qcow2", p, "20M"]);
        run(&["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 3M", p]);
        run(&["qemu-io", "-f", "qcow2", "-c", "write -P 0x00 8M 1M", p]);
        run(&["qemu-io", "-f", "qcow2", "-c", "write -P 0x33 17M 100k", p]);
        let reader = ImageReader::open(&img, "qcow2").unwrap();
        let b = backup_disk(&repo, &reader, 1 << 20, 2, &|_, _| {}).unwrap();
        assert_eq!((b.data_chunks, b.zero_chunks), (4, 16));
        let out = d.path().join("out.raw");
        restore_disk(&repo, &b.index, &out, 2, &|_, _| {}).unwrap();
        let expect = d.path().join("expect.raw");
        run(&[
            "qemu-img",
            "convert",
            "-O",
            "raw",
            p,
            expect.to_str().unwrap(),
        ]);
        assert!(std::fs::read(&out).unwrap() == std::fs::read(&expect).unwrap());
    }

    #[test]
    fn data_in_a_backing_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.qcow2");
        let top = dir.path().join("top.qcow2");
        run(&[
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            base.to_str().unwrap(),
            "1M",
        ]);
        run(&[
            "qemu-io",
            "-f",
            "qcow2",
            "-c",
            "write -P 1 0 4k",
            base.to_str().unwrap(),
        ]);
        run(&[
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            base.to_str().unwrap(),
            top.to_str().unwrap(),
        ]);
        assert!(matches!(
            ImageReader::open(&top, "qcow2"),
            Err(ImageError::Unsupported { .. })
        ));
    }
}
