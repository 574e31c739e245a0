//! Files that cannot be hijacked, shared by the file store, the publishers
//! and the signer's sockets. Every access goes through a [`Dir`]: the
//! folder is opened once and checked, and each file in it is opened,
//! created, renamed and removed relative to that handle without following
//! a symbolic link. Replacement is atomic (a temp file in the same folder,
//! fsync, rename over the target, fsync the folder), and every read is
//! bounded and refuses anything but a regular file.
//!
//! The rules, written once here and in the README ("File safety"):
//!
//! - a symbolic link at a file keyroll reads or writes is refused, never
//!   followed, replaced or deleted;
//! - a symbolic link inside a configured folder path is followed only if it
//!   is owned by keyroll's user or root (who else could have made it is
//!   someone else), as the kernel's `protected_symlinks` does in `/tmp`;
//! - the folder, and every folder above it, may be group- or world-writable
//!   only if it is owned by keyroll's user or root: `/tmp` (root, sticky)
//!   and a Kubernetes `emptyDir` (root, 0777) pass, a 0777 folder of
//!   another user does not;
//! - a FIFO, a device, a socket or a folder where a file should be is
//!   refused, and reads stop one byte past the largest content expected.

use std::ffi::OsStr;
use std::fs::{self, File, Permissions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Stat};
use rustix::io::Errno;
use zeroize::Zeroizing;

/// Why a path is refused or could not be used; each names the path.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error(
        "{path} is a symbolic link (to {target}): keyroll never reads or writes through a link \
         at a file it writes; remove the link"
    )]
    Symlink { path: String, target: String },
    #[error(
        "{path} is {kind}, not a regular file: keyroll never reads, replaces or deletes it; \
         remove it or choose another path"
    )]
    NotRegular { path: String, kind: &'static str },
    #[error("{path} is larger than {limit} bytes, more than keyroll ever writes there; it is left untouched")]
    TooLarge { path: String, limit: usize },
    #[error("{path} is not a folder")]
    NotAFolder { path: String },
    #[error(
        "{path} is {writable} and owned by uid {owner}, neither keyroll's user (uid {ours}) nor \
         root: whoever can write there could replace what keyroll writes; make it owned by uid \
         {ours} or root, or remove group and world write (chmod go-w)"
    )]
    UnsafeFolder {
        path: String,
        writable: &'static str,
        owner: u32,
        ours: u32,
    },
    #[error(
        "{path} is a symbolic link owned by uid {owner}, neither keyroll's user (uid {ours}) nor \
         root: someone else may have planted it, so keyroll does not follow it"
    )]
    UntrustedLink { path: String, owner: u32, ours: u32 },
    #[error(
        "{path}: {existing} is a {fs} filesystem, which shows kernel state and takes no files"
    )]
    KernelFs {
        path: String,
        existing: String,
        fs: &'static str,
    },
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
}

impl FsError {
    /// Whether the error only says that the path (or its folder) is absent.
    pub fn is_not_found(&self) -> bool {
        matches!(self, FsError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound)
    }

    fn io(action: &'static str, path: &Path, source: impl Into<io::Error>) -> FsError {
        FsError::Io {
            action,
            path: path.display().to_string(),
            source: source.into(),
        }
    }
}

fn our_uid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// The folder rule: group- or world-writable only when owned by us or root.
/// Pure, so tests can hand it any owner and mode.
pub fn check_folder(path: &Path, mode: u32, owner: u32, ours: u32) -> Result<(), FsError> {
    let writable = match (mode & 0o020 != 0, mode & 0o002 != 0) {
        (false, false) => return Ok(()),
        (true, false) => "group-writable",
        (false, true) => "world-writable",
        (true, true) => "group- and world-writable",
    };
    if owner == ours || owner == 0 {
        return Ok(());
    }
    Err(FsError::UnsafeFolder {
        path: path.display().to_string(),
        writable,
        owner,
        ours,
    })
}

/// The symlink rule for configured folder paths: a link on the way is
/// followed only if keyroll's user or root made it.
pub fn check_link(path: &Path, owner: u32, ours: u32) -> Result<(), FsError> {
    if owner == ours || owner == 0 {
        return Ok(());
    }
    Err(FsError::UntrustedLink {
        path: path.display().to_string(),
        owner,
        ours,
    })
}

fn kind_of(file_type: FileType) -> &'static str {
    match file_type {
        FileType::RegularFile => "a regular file",
        FileType::Directory => "a folder",
        FileType::Symlink => "a symbolic link",
        FileType::Fifo => "a FIFO (named pipe)",
        FileType::Socket => "a socket",
        FileType::CharacterDevice => "a character device",
        FileType::BlockDevice => "a block device",
        FileType::Unknown => "a special file",
    }
}

/// Filesystems that show kernel state: nothing keyroll writes belongs there.
fn kernel_fs(magic: i64) -> Option<&'static str> {
    match magic {
        0x9fa0 => Some("proc"),
        0x6265_6572 => Some("sysfs"),
        0x0027_e0eb => Some("cgroup"),
        0x6367_7270 => Some("cgroup2"),
        0x6462_6720 => Some("debugfs"),
        0x7363_6673 => Some("securityfs"),
        0xcafe_4a11 => Some("bpf"),
        _ => None,
    }
}

/// A folder opened once and checked; every file operation is relative to
/// it and never follows a symbolic link at the file's name.
pub struct Dir {
    fd: OwnedFd,
    path: PathBuf,
}

impl Dir {
    /// Opens the folder at `path`, which must pass the link and folder
    /// rules (see the module header).
    pub fn open(path: &Path) -> Result<Dir, FsError> {
        let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let ours = our_uid();
        for step in path.ancestors() {
            match fs::symlink_metadata(step) {
                Ok(meta) if meta.file_type().is_symlink() => {
                    use std::os::unix::fs::MetadataExt;
                    check_link(step, meta.uid(), ours)?;
                }
                // Missing or unreadable: the open below says why.
                _ => {}
            }
        }
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
        let fd = rustix::fs::open(&path, flags, Mode::empty()).map_err(|e| match e {
            Errno::NOTDIR => FsError::NotAFolder {
                path: path.display().to_string(),
            },
            e => FsError::io("open the folder", &path, e),
        })?;
        let stat = rustix::fs::fstat(&fd).map_err(|e| FsError::io("inspect", &path, e))?;
        check_folder(&path, stat.st_mode, stat.st_uid, ours)?;
        // The folders above: whoever can rename one can swap this one.
        let real = fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
        for above in real.ancestors().skip(1) {
            if let Ok(stat) = rustix::fs::stat(above) {
                check_folder(above, stat.st_mode, stat.st_uid, ours)?;
            }
        }
        Ok(Dir { fd, path })
    }

    /// Opens the folder at `path`, creating it first (see [`ensure_dir`]).
    pub fn create(path: &Path, mode: u32) -> Result<Dir, FsError> {
        ensure_dir(path, mode)?;
        Dir::open(path)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The folder's group, read from the open handle.
    pub fn group(&self) -> Result<u32, FsError> {
        rustix::fs::fstat(&self.fd)
            .map(|stat| stat.st_gid)
            .map_err(|e| FsError::io("inspect", &self.path, e))
    }

    fn file_path(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    fn symlink_error(&self, name: &str) -> FsError {
        let target = rustix::fs::readlinkat(&self.fd, name, Vec::new())
            .map(|t| t.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "an unreadable target".to_string());
        FsError::Symlink {
            path: self.file_path(name).display().to_string(),
            target,
        }
    }

    /// `Ok(Some(stat))` for a regular file, `Ok(None)` if nothing is
    /// there, an error naming anything else.
    fn regular(&self, name: &str, stat: Stat) -> Result<Stat, FsError> {
        match FileType::from_raw_mode(stat.st_mode) {
            FileType::RegularFile => Ok(stat),
            FileType::Symlink => Err(self.symlink_error(name)),
            other => Err(FsError::NotRegular {
                path: self.file_path(name).display().to_string(),
                kind: kind_of(other),
            }),
        }
    }

    /// What is at `name` without following a link: `None` when absent,
    /// an error for anything but a regular file.
    pub fn check_file(&self, name: &str) -> Result<Option<Stat>, FsError> {
        match rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) => self.regular(name, stat).map(Some),
            Err(Errno::NOENT) => Ok(None),
            Err(e) => Err(FsError::io("inspect", &self.file_path(name), e)),
        }
    }

    /// Reads `name` if it is a regular file, up to `limit` bytes (more is
    /// an error). The bytes may be a private key: they are zeroized on drop.
    pub fn read(&self, name: &str, limit: usize) -> Result<Option<Zeroizing<Vec<u8>>>, FsError> {
        // Looked at first, so a device or FIFO is never even opened.
        if self.check_file(name)?.is_none() {
            return Ok(None);
        }
        let flags =
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC;
        let fd = match rustix::fs::openat(&self.fd, name, flags, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => return Ok(None),
            Err(Errno::LOOP) => return Err(self.symlink_error(name)),
            Err(e) => return Err(FsError::io("open", &self.file_path(name), e)),
        };
        // Swapped between the look and the open: judged again on the handle.
        let stat =
            rustix::fs::fstat(&fd).map_err(|e| FsError::io("inspect", &self.file_path(name), e))?;
        let stat = self.regular(name, stat)?;
        let hint = usize::try_from(stat.st_size).unwrap_or(usize::MAX);
        let bytes = read_bounded(&mut File::from(fd), hint, limit)
            .map_err(|e| FsError::io("read", &self.file_path(name), e))?;
        if bytes.len() > limit {
            return Err(FsError::TooLarge {
                path: self.file_path(name).display().to_string(),
                limit,
            });
        }
        Ok(Some(bytes))
    }

    /// Replaces `name` atomically with `bytes` and permission bits `mode`.
    pub fn write_atomic(&self, name: &str, bytes: &[u8], mode: u32) -> Result<(), FsError> {
        self.check_file(name)?;
        let target = self.file_path(name);
        let (temp, file) = self.create_temp(name)?;
        let written = write_and_rename(&self.fd, file, &temp, name, bytes, mode);
        if let Err(e) = written {
            let _ = rustix::fs::unlinkat(&self.fd, &temp, AtFlags::empty());
            return Err(FsError::io("replace", &target, e));
        }
        rustix::fs::fsync(&self.fd).map_err(|e| FsError::io("sync the folder of", &target, e))?;
        self.remove_stale_temps(name);
        Ok(())
    }

    /// Writes only when the content or the mode differs: outputs watched
    /// by other programs change only when something really changed.
    /// Returns whether it wrote.
    pub fn write_if_changed(&self, name: &str, bytes: &[u8], mode: u32) -> Result<bool, FsError> {
        // One byte more than the new content is enough to tell them apart.
        if let Some(current) = self.read(name, bytes.len() + 1).or_else(|e| match e {
            FsError::TooLarge { .. } => Ok(None),
            e => Err(e),
        })? {
            let stat = self.check_file(name)?;
            if current.as_slice() == bytes && stat.is_some_and(|s| s.st_mode & 0o777 == mode) {
                return Ok(false);
            }
        }
        self.write_atomic(name, bytes, mode)?;
        Ok(true)
    }

    /// Removes `name` if it is a regular file; `false` if it was absent.
    /// Anything else there is refused and left alone.
    pub fn remove(&self, name: &str) -> Result<bool, FsError> {
        if self.check_file(name)?.is_none() {
            return Ok(false);
        }
        match rustix::fs::unlinkat(&self.fd, name, AtFlags::empty()) {
            Ok(()) => Ok(true),
            Err(Errno::NOENT) => Ok(false),
            Err(e) => Err(FsError::io("remove", &self.file_path(name), e)),
        }
    }

    /// Opens (creating, 0600) a lock file; never through a link.
    pub fn open_lock(&self, name: &str) -> Result<File, FsError> {
        let flags = OFlags::RDWR
            | OFlags::CREATE
            | OFlags::NOFOLLOW
            | OFlags::NONBLOCK
            | OFlags::NOCTTY
            | OFlags::CLOEXEC;
        let fd = match rustix::fs::openat(&self.fd, name, flags, Mode::from_raw_mode(0o600)) {
            Ok(fd) => fd,
            Err(Errno::LOOP) => return Err(self.symlink_error(name)),
            Err(e) => return Err(FsError::io("open the lock file", &self.file_path(name), e)),
        };
        let stat =
            rustix::fs::fstat(&fd).map_err(|e| FsError::io("inspect", &self.file_path(name), e))?;
        self.regular(name, stat)?;
        Ok(File::from(fd))
    }

    /// Renames `from` in this folder over `to`; neither name is followed.
    pub fn rename(&self, from: &Path, to: &str) -> Result<(), FsError> {
        rustix::fs::renameat(rustix::fs::CWD, from, &self.fd, to)
            .map_err(|e| FsError::io("move into place", &self.file_path(to), e))
    }

    /// The inode at `name`, not following a link, if something is there.
    pub fn inode(&self, name: &str) -> Option<(FileType, u64)> {
        rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW)
            .ok()
            .map(|s| (FileType::from_raw_mode(s.st_mode), s.st_ino))
    }

    /// Removes whatever is at `name` without following it (a socket).
    pub fn unlink(&self, name: &str) -> Result<(), FsError> {
        rustix::fs::unlinkat(&self.fd, name, AtFlags::empty())
            .map_err(|e| FsError::io("remove", &self.file_path(name), e))
    }

    /// Fails with the reason nothing can be created here, if so.
    fn probe_writable(&self) -> Result<(), FsError> {
        if let Ok(statfs) = rustix::fs::fstatfs(&self.fd) {
            #[allow(clippy::unnecessary_cast)] // the word is 32 bits on some targets
            let magic = statfs.f_type as i64;
            if let Some(fs) = kernel_fs(magic) {
                return Err(FsError::KernelFs {
                    path: self.path.display().to_string(),
                    existing: self.path.display().to_string(),
                    fs,
                });
            }
        }
        // Trying is the only reliable test (read-only mounts, ACLs,
        // SELinux); an unnamed file leaves nothing behind.
        let flags = OFlags::TMPFILE | OFlags::WRONLY | OFlags::CLOEXEC;
        match rustix::fs::openat(&self.fd, ".", flags, Mode::from_raw_mode(0o600)) {
            Ok(_) => Ok(()),
            // No O_TMPFILE on this filesystem: a named file, removed at once.
            Err(Errno::OPNOTSUPP | Errno::ISDIR | Errno::INVAL) => {
                let (temp, _file) = self.create_temp("keyroll-probe")?;
                let _ = rustix::fs::unlinkat(&self.fd, &temp, AtFlags::empty());
                Ok(())
            }
            Err(e) => Err(FsError::io("create files in", &self.path, e)),
        }
    }

    /// `.<name>.XXXXXX`, created 0600 so secrets are never readable in
    /// between; the final mode is set before the rename makes it visible.
    fn create_temp(&self, name: &str) -> Result<(String, File), FsError> {
        use rand::Rng;
        let flags = OFlags::WRONLY
            | OFlags::CREATE
            | OFlags::EXCL
            | OFlags::NOFOLLOW
            | OFlags::NOCTTY
            | OFlags::CLOEXEC;
        let mut last = Errno::EXIST;
        for _ in 0..16 {
            let suffix: String = rand::thread_rng()
                .sample_iter(rand::distributions::Alphanumeric)
                .take(TEMP_SUFFIX)
                .map(char::from)
                .collect();
            let temp = format!(".{name}.{suffix}");
            match rustix::fs::openat(&self.fd, &temp, flags, Mode::from_raw_mode(0o600)) {
                Ok(fd) => return Ok((temp, File::from(fd))),
                Err(Errno::EXIST) => last = Errno::EXIST,
                Err(e) => {
                    last = e;
                    break;
                }
            }
        }
        Err(FsError::io(
            "create a temporary file beside",
            &self.file_path(name),
            last,
        ))
    }

    /// Removes `.<name>.XXXXXX` files that killed writers left beside the
    /// target: in the store folder they hold private keys. Best effort, and
    /// only after a successful write, so it costs one folder read per change.
    fn remove_stale_temps(&self, name: &str) {
        self.remove_temps(name, Some(STALE_TEMP_AGE));
    }

    /// Removes every `.<name>.XXXXXX` temp file, whatever its age: for a
    /// caller that holds the lock every writer of `name` takes, so no live
    /// writer can own one (the file store after a save).
    pub fn remove_dead_writers_temps(&self, name: &str) {
        self.remove_temps(name, None);
    }

    /// The temp files of `name` older than `min_age` (all with `None`),
    /// looked at and unlinked without following links.
    fn remove_temps(&self, name: &str, min_age: Option<std::time::Duration>) {
        let Ok(mut entries) = rustix::fs::Dir::read_from(&self.fd) else {
            return;
        };
        let prefix = format!(".{name}.");
        let now = std::time::SystemTime::now();
        while let Some(Ok(entry)) = entries.next() {
            let entry_name = entry.file_name().to_bytes();
            if entry_name.len() != prefix.len() + TEMP_SUFFIX
                || !entry_name.starts_with(prefix.as_bytes())
            {
                continue;
            }
            let entry_name = OsStr::from_bytes(entry_name);
            let Ok(stat) = rustix::fs::statat(&self.fd, entry_name, AtFlags::SYMLINK_NOFOLLOW)
            else {
                continue;
            };
            let modified = std::time::UNIX_EPOCH
                + std::time::Duration::new(
                    u64::try_from(stat.st_mtime).unwrap_or(0),
                    u32::try_from(stat.st_mtime_nsec).unwrap_or(0),
                );
            let stale = min_age
                .is_none_or(|min_age| now.duration_since(modified).is_ok_and(|age| age > min_age));
            if stale && FileType::from_raw_mode(stat.st_mode) == FileType::RegularFile {
                let _ = rustix::fs::unlinkat(&self.fd, entry_name, AtFlags::empty());
            }
        }
    }
}

/// Random characters after `.<name>.` in a temp file's name.
const TEMP_SUFFIX: usize = 6;

/// A temp file this old was left by a writer that was killed between
/// creating and renaming it (a live writer renames within milliseconds).
const STALE_TEMP_AGE: std::time::Duration = std::time::Duration::from_secs(60);

fn write_and_rename(
    dir: &OwnedFd,
    mut file: File,
    temp: &str,
    name: &str,
    bytes: &[u8],
    mode: u32,
) -> io::Result<()> {
    file.write_all(bytes)?;
    rustix::fs::fchmod(file.as_fd(), Mode::from_raw_mode(mode))?;
    file.sync_all()?;
    rustix::fs::renameat(dir, temp, dir, name)?;
    Ok(())
}

/// Reads at most `limit + 1` bytes, into buffers that are zeroized when
/// they grow or drop. `hint` is the size the file had when it was opened.
fn read_bounded(file: &mut File, hint: usize, limit: usize) -> io::Result<Zeroizing<Vec<u8>>> {
    let cap = limit.saturating_add(1);
    let mut buf = Zeroizing::new(vec![0u8; hint.saturating_add(1).clamp(1, cap)]);
    let mut len = 0;
    loop {
        if len == buf.len() {
            if len >= cap {
                break;
            }
            let mut bigger = Zeroizing::new(vec![0u8; len.saturating_mul(2).min(cap)]);
            bigger[..len].copy_from_slice(&buf[..len]);
            buf = bigger;
        }
        match file.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(len);
    Ok(buf)
}

/// The folder of `path` and its file name.
fn split(path: &Path) -> Result<(&Path, &str), FsError> {
    let name = path
        .file_name()
        .and_then(OsStr::to_str)
        .ok_or_else(|| FsError::Io {
            action: "use",
            path: path.display().to_string(),
            source: io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a file name keyroll can use",
            ),
        })?;
    Ok((parent_dir(path), name))
}

/// Writes `bytes` to `path` atomically with the given permission bits.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), FsError> {
    let (dir, name) = split(path)?;
    Dir::open(dir)?.write_atomic(name, bytes, mode)
}

/// [`Dir::write_if_changed`] for one path.
pub fn write_if_changed(path: &Path, bytes: &[u8], mode: u32) -> Result<bool, FsError> {
    let (dir, name) = split(path)?;
    Dir::open(dir)?.write_if_changed(name, bytes, mode)
}

/// [`Dir::remove`] for one path; a missing folder means nothing to remove.
pub fn remove_file(path: &Path) -> Result<bool, FsError> {
    let (dir, name) = split(path)?;
    match Dir::open(dir) {
        Ok(dir) => dir.remove(name),
        Err(e) if e.is_not_found() => Ok(false),
        Err(e) => Err(e),
    }
}

/// Creates `dir` (and parents) if missing; a folder keyroll creates gets `mode`.
pub fn ensure_dir(dir: &Path, mode: u32) -> Result<(), FsError> {
    if dir.is_dir() {
        return Ok(());
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)
        .map_err(|e| FsError::io("create the folder", dir, e))?;
    // The umask may have narrowed or (never) widened the mode: set it exactly.
    fs::set_permissions(dir, Permissions::from_mode(mode))
        .map_err(|e| FsError::io("set the mode of", dir, e))
}

pub fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Whether `dir` exists and is writable, or can be created under a
/// writable parent, under the folder rules; if not, why, naming the folder.
pub fn writable_dir(dir: &Path) -> Result<(), FsError> {
    let mut existing = dir;
    while matches!(fs::symlink_metadata(existing), Err(e) if e.kind() == io::ErrorKind::NotFound) {
        existing = parent_dir(existing);
    }
    let opened = Dir::open(existing)?;
    opened.probe_writable().map_err(|e| match e {
        FsError::KernelFs { existing, fs, .. } => FsError::KernelFs {
            path: dir.display().to_string(),
            existing,
            fs,
        },
        e => e,
    })
}

/// What `validate` and `run` check for a file keyroll will write: its
/// folder as [`writable_dir`] does, and nothing but a regular file at it.
/// Writes nothing.
pub fn check_output_file(path: &Path) -> Result<(), FsError> {
    let (dir, name) = split(path)?;
    match Dir::open(dir) {
        Ok(opened) => {
            opened.check_file(name)?;
        }
        Err(e) if e.is_not_found() => {}
        Err(e) => return Err(e),
    }
    writable_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode_of(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn writes_with_mode_and_skips_identical_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.json");
        assert!(write_if_changed(&path, b"one", 0o644).unwrap());
        assert_eq!(mode_of(&path), 0o644);
        assert!(!write_if_changed(&path, b"one", 0o644).unwrap());
        assert!(write_if_changed(&path, b"two", 0o600).unwrap());
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(mode_of(&path), 0o600);
        // A longer file whose start is the new content is still rewritten.
        fs::write(&path, b"two and more").unwrap();
        assert!(write_if_changed(&path, b"two", 0o600).unwrap());
        assert_eq!(fs::read(&path).unwrap(), b"two");
        // No temp files are left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_write_removes_temps_that_killed_writers_left_only_when_stale() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("default.json");
        let left = |name: &str, age_secs: u64| {
            let file = File::create(dir.path().join(name)).unwrap();
            let at = std::time::SystemTime::now() - std::time::Duration::from_secs(age_secs);
            file.set_modified(at).unwrap();
        };
        left(".default.json.aB3dE9", 3600); // a killed writer's, an hour ago
        left(".default.json.zZ9yY8", 0); // a live writer's, right now
        left(".other.json.aB3dE9", 3600); // another file's: not ours to judge
        left(".default.json.notatemp", 3600); // not a temp file's shape
        write_atomic(&path, b"doc", 0o600).unwrap();
        let mut names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                ".default.json.notatemp",
                ".default.json.zZ9yY8",
                ".other.json.aB3dE9",
                "default.json"
            ]
        );
    }

    #[test]
    fn a_symlink_at_the_file_is_refused_and_its_target_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let decoy = dir.path().join("decoy");
        fs::write(&decoy, b"decoy").unwrap();
        let link = dir.path().join("out.json");
        std::os::unix::fs::symlink(&decoy, &link).unwrap();
        let opened = Dir::open(dir.path()).unwrap();
        for result in [
            opened.write_if_changed("out.json", b"new", 0o644).map(drop),
            opened.write_atomic("out.json", b"new", 0o644),
            opened.read("out.json", 100).map(drop),
            opened.remove("out.json").map(drop),
            opened.open_lock("out.json").map(drop),
        ] {
            let message = result.unwrap_err().to_string();
            assert!(
                message.contains(&link.display().to_string())
                    && message.contains("is a symbolic link")
                    && message.contains(&decoy.display().to_string()),
                "{message}"
            );
        }
        assert_eq!(fs::read(&decoy).unwrap(), b"decoy");
        assert!(fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        // A dangling link is not created through either.
        let dangling = dir.path().join("gone");
        std::os::unix::fs::symlink(&dangling, dir.path().join("lock")).unwrap();
        assert!(opened.open_lock("lock").is_err());
        assert!(!dangling.exists());
    }

    #[test]
    fn a_fifo_or_a_device_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let opened = Dir::open(dir.path()).unwrap();
        rustix::fs::mkfifoat(&opened.fd, "pipe", Mode::from_raw_mode(0o600)).unwrap();
        let message = opened.read("pipe", 100).unwrap_err().to_string();
        assert!(message.contains("is a FIFO"), "{message}");
        let message = opened
            .write_if_changed("pipe", b"x", 0o600)
            .unwrap_err()
            .to_string();
        assert!(message.contains("is a FIFO"), "{message}");
        let message = opened.open_lock("pipe").unwrap_err().to_string();
        assert!(message.contains("is a FIFO"), "{message}");
        let dev = Dir::open(Path::new("/dev")).unwrap();
        let message = dev.read("zero", 100).unwrap_err().to_string();
        assert!(
            message.contains("/dev/zero is a character device"),
            "{message}"
        );
    }

    #[test]
    fn reads_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("big"), vec![b'x'; 10_000]).unwrap();
        let opened = Dir::open(dir.path()).unwrap();
        assert_eq!(opened.read("big", 10_000).unwrap().unwrap().len(), 10_000);
        let message = opened.read("big", 9_999).unwrap_err().to_string();
        assert!(message.contains("larger than 9999 bytes"), "{message}");
        assert!(opened.read("absent", 10).unwrap().is_none());
    }

    #[test]
    fn the_folder_rule() {
        let p = Path::new("/srv/out");
        // Not writable by others: whoever owns it.
        assert!(check_folder(p, 0o755, 1000, 999).is_ok());
        // Writable by others: only ours or root's (sticky /tmp, emptyDir).
        assert!(check_folder(p, 0o1777, 0, 999).is_ok());
        assert!(check_folder(p, 0o777, 0, 999).is_ok());
        assert!(check_folder(p, 0o770, 999, 999).is_ok());
        for (mode, what) in [
            (0o777, "group- and world-writable"),
            (0o1777, "group- and world-writable"),
            (0o775, "group-writable"),
            (0o757, "world-writable"),
        ] {
            let message = check_folder(p, mode, 65534, 999).unwrap_err().to_string();
            assert!(
                message.starts_with(&format!("/srv/out is {what} and owned by uid 65534")),
                "{message}"
            );
        }
        assert!(check_link(p, 0, 999).is_ok());
        assert!(check_link(p, 999, 999).is_ok());
        let message = check_link(p, 65534, 999).unwrap_err().to_string();
        assert!(
            message.contains("symbolic link owned by uid 65534"),
            "{message}"
        );
    }

    #[test]
    fn a_world_writable_folder_of_another_user_is_refused() {
        if our_uid() != 0 {
            // Only root can give a folder away; the rule itself is tested above.
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let shared = dir.path().join("shared");
        fs::create_dir(&shared).unwrap();
        rustix::fs::chown(&shared, Some(rustix::fs::Uid::from_raw(65534)), None).unwrap();
        fs::set_permissions(&shared, Permissions::from_mode(0o777)).unwrap();
        let message = write_if_changed(&shared.join("jwks.json"), b"x", 0o644)
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("world-writable and owned by uid 65534"),
            "{message}"
        );
        assert!(writable_dir(&shared.join("below")).is_err());
        assert_eq!(fs::read_dir(&shared).unwrap().count(), 0);
    }

    #[test]
    fn nothing_can_be_made_under_proc_and_the_error_says_why() {
        let message = writable_dir(Path::new("/proc/keyroll"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            message,
            "/proc/keyroll: /proc is a proc filesystem, which shows kernel state and takes no files"
        );
    }
}
