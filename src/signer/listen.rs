//! The signer's socket paths, treated like every other output (SPEC §4): a
//! missing folder is created; a stale socket left by a crash is replaced;
//! any other file at the path, or a parent that is not a folder, is refused
//! and never deleted. The socket gets `socket_mode` and its folder's group,
//! so the folder's group decides who may sign. The folder follows the
//! rules of [`crate::fsutil`], and the socket is replaced and removed
//! relative to the folder's handle, never through a link.

use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::UnixListener;

use super::SignerError;
use crate::config::{Config, Problem};
use crate::fsutil::{self, Dir, FsError};

/// `sun_path` holds 108 bytes on Linux, the terminating NUL included.
const MAX_SOCKET_PATH: usize = 107;

/// Why a socket path is refused or cannot be listened on.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("{path} is {len} bytes long; a Unix socket path holds at most {MAX_SOCKET_PATH}")]
    TooLong { path: String, len: usize },
    #[error(
        "{path} exists and is not a socket ({kind}); keyroll never deletes it: remove it or \
         choose another path"
    )]
    NotASocket { path: String, kind: &'static str },
    #[error("{path} is also signer.{other}: each socket needs its own path")]
    Shared { path: String, other: &'static str },
    #[error("{path} is inside {other}, which keyroll writes: give the socket its own path")]
    InsideOutput { path: String, other: String },
    #[error("another process is listening on this socket (is keyroll already running?)")]
    InUse,
    #[error(transparent)]
    Folder(#[from] FsError),
    #[error("cannot {action}: {source}")]
    Io {
        action: &'static str,
        #[source]
        source: io::Error,
    },
}

impl SocketError {
    fn io(action: &'static str) -> impl FnOnce(io::Error) -> SocketError {
        move |source| SocketError::Io { action, source }
    }
}

/// The socket paths of `config` with their config keys.
fn socket_paths(config: &Config) -> Vec<(&'static str, &Path)> {
    let Some(signer) = &config.signer else {
        return Vec::new();
    };
    let mut paths = Vec::new();
    if let Some(path) = &signer.socket {
        paths.push(("socket", path.as_path()));
    }
    if let Some(kubernetes) = &signer.kubernetes {
        paths.push(("kubernetes_socket", kubernetes.socket.as_path()));
    }
    paths
}

/// What `validate` and `run` refuse about the socket paths, without
/// touching them: a path that exists and is not a socket, a parent that is
/// not a writable folder, a path too long for a socket, two outputs on one
/// path.
pub fn check_socket_paths(config: &Config) -> Vec<Problem> {
    let mut problems = Vec::new();
    let paths = socket_paths(config);
    let others = other_outputs(config);
    for (index, (key, path)) in paths.iter().enumerate() {
        let mut refuse = |error: SocketError| {
            problems.push(Problem {
                line: None,
                key: format!("signer.{key}"),
                message: error.to_string(),
            })
        };
        if let Err(error) = check_one(path) {
            refuse(error);
            continue;
        }
        let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let shown = path.display().to_string();
        if let Some((other, _)) = paths[..index]
            .iter()
            .find(|(_, p)| std::path::absolute(p).ok().as_deref() == Some(&absolute))
        {
            refuse(SocketError::Shared { path: shown, other });
        } else if let Some((other, _)) = others.iter().find(|(_, p)| absolute.starts_with(p)) {
            refuse(SocketError::InsideOutput {
                path: shown,
                other: other.clone(),
            });
        }
    }
    problems
}

/// Paths keyroll writes that a socket must stay out of.
fn other_outputs(config: &Config) -> Vec<(String, PathBuf)> {
    let absolute = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let mut outputs = Vec::new();
    if let crate::config::StoreSettings::File { dir } = &config.store {
        outputs.push(("the store folder (store.dir)".to_string(), absolute(dir)));
    }
    for keyset in &config.keysets {
        if let Some(file) = &keyset.jwks_file {
            outputs.push((
                format!("keysets[{}].jwks_file", keyset.name),
                absolute(file),
            ));
        }
        if let Some(dir) = &keyset.signing_dir {
            outputs.push((
                format!("keysets[{}].signing_dir", keyset.name),
                absolute(dir),
            ));
        }
    }
    outputs
}

fn check_one(path: &Path) -> Result<(), SocketError> {
    if path.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(SocketError::TooLong {
            path: path.display().to_string(),
            len: path.as_os_str().len(),
        });
    }
    let (dir, name) = open_parent(path)?;
    if let Some(dir) = dir {
        socket_or_nothing(&dir, &name, path)?;
    }
    Ok(fsutil::writable_dir(fsutil::parent_dir(path))?)
}

/// The socket's folder, if it exists yet, and the socket's name in it.
fn open_parent(path: &Path) -> Result<(Option<Dir>, PathBuf), SocketError> {
    let name = PathBuf::from(path.file_name().unwrap_or(path.as_os_str()));
    match Dir::open(fsutil::parent_dir(path)) {
        Ok(dir) => Ok((Some(dir), name)),
        Err(e) if e.is_not_found() => Ok((None, name)),
        Err(e) => Err(e.into()),
    }
}

/// Refuses anything at `name` but a socket (a link included); returns the
/// socket's inode if one is there.
fn socket_or_nothing(dir: &Dir, name: &Path, path: &Path) -> Result<Option<u64>, SocketError> {
    use rustix::fs::FileType;
    match dir.inode(&name.to_string_lossy()) {
        None => Ok(None),
        Some((FileType::Socket, inode)) => Ok(Some(inode)),
        Some((other, _)) => Err(SocketError::NotASocket {
            path: path.display().to_string(),
            kind: match other {
                FileType::Symlink => "a symbolic link",
                FileType::Directory => "a folder",
                FileType::RegularFile => "a regular file",
                FileType::Fifo => "a FIFO",
                FileType::CharacterDevice | FileType::BlockDevice => "a device",
                _ => "a special file",
            },
        }),
    }
}

/// Binds a socket at `path` for `key` (`socket` or `kubernetes_socket`).
pub(super) fn bind(
    path: &Path,
    mode: u32,
    key: &'static str,
) -> Result<(UnixListener, SocketFile), SignerError> {
    let fail = |source: SocketError| SignerError::Socket {
        key,
        path: path.display().to_string(),
        source,
    };
    check_one(path).map_err(fail)?;
    let parent = fsutil::parent_dir(path);
    // A folder keyroll creates is traversable by all: the socket's own
    // mode and group decide who may connect.
    let dir = Dir::create(parent, 0o755).map_err(|e| fail(e.into()))?;
    let name = path
        .file_name()
        .unwrap_or(path.as_os_str())
        .to_string_lossy();
    if socket_or_nothing(&dir, Path::new(&*name), path)
        .map_err(fail)?
        .is_some()
    {
        // A socket is there (check_one refused anything else). If a process
        // still answers on it, it is not stale: leave it to that process.
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(fail(SocketError::InUse));
        }
        tracing::info!(socket = %path.display(), "replacing a stale socket");
    }
    // Bound in a private (0700) folder beside the path, given its group and
    // mode there, then renamed into place (replacing a stale socket): no
    // client can connect while the mode is still the umask's.
    let private = tempfile::Builder::new()
        .prefix(".keyroll-socket.")
        .tempdir_in(dir.path())
        .map_err(|e| fail(SocketError::io("create a temporary folder beside it")(e)))?;
    let staged = private.path().join("s");
    let listener = UnixListener::bind(&staged).map_err(|e| fail(SocketError::io("listen")(e)))?;
    let group = dir.group().map_err(|e| fail(e.into()))?;
    match std::os::unix::fs::chown(&staged, None, Some(group)) {
        Ok(()) => {}
        // Not a member of the folder's group, as under systemd's
        // DynamicUser= (the runtime folder gets the user's own group): the
        // socket keeps keyroll's primary group, the unit's Group=, which is
        // the group signers join.
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            let own = std::fs::metadata(&staged).map(|m| m.gid()).ok();
            tracing::warn!(
                socket = %path.display(),
                folder_group = group,
                socket_group = ?own,
                "keyroll is not in its folder's group: the socket keeps keyroll's own group, whose members may sign"
            );
        }
        Err(e) => {
            return Err(fail(SocketError::io("give the socket its folder's group")(
                e,
            )));
        }
    }
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(mode))
        .map_err(|e| fail(SocketError::io("set the socket's mode")(e)))?;
    // Renamed over a stale socket, or a link planted since the check: the
    // link itself is replaced, never followed.
    dir.rename(&staged, &name).map_err(|e| fail(e.into()))?;
    let inode = dir.inode(&name).map(|(_, inode)| inode);
    Ok((
        listener,
        SocketFile {
            name: name.into_owned(),
            dir,
            inode,
        },
    ))
}

/// Removes the socket when the server stops, if it is still the one this
/// process bound (same inode): a successor's is left alone. The folder's
/// handle is kept, so a folder moved or replaced since is not followed.
pub(super) struct SocketFile {
    dir: Dir,
    name: String,
    inode: Option<u64>,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let current = self.dir.inode(&self.name);
        if current.is_some_and(|(kind, inode)| {
            kind == rustix::fs::FileType::Socket && Some(inode) == self.inode
        }) {
            let _ = self.dir.unlink(&self.name);
        }
    }
}
