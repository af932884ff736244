//! One agent at a time per node: an exclusive, non-blocking `flock` on a file
//! in the state dir, held for the life of the returned guard. The kernel
//! releases it when the process dies, so a crash never leaves a stale lock.

use std::fs::{File, OpenOptions};
use std::path::Path;

use nix::fcntl::{Flock, FlockArg};

use super::StateError;

#[derive(Debug)]
pub struct AgentLock {
    _lock: Flock<File>,
}

pub fn acquire(path: &Path) -> Result<AgentLock, StateError> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|source| StateError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(AgentLock { _lock: lock }),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(StateError::Locked {
            path: path.to_path_buf(),
        }),
        Err((_, errno)) => Err(StateError::Io {
            path: path.to_path_buf(),
            source: errno.into(),
        }),
    }
}
