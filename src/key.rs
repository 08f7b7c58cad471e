//! The server's message-authentication key (see `outbox_core::message`).
//!
//! It lives in `$PGDATA/outbox.key` (mode 0600): readable by the server, not
//! by any role (reading files there takes superuser or pg_read_server_files,
//! and those can forge events anyway). The postmaster creates it on first
//! start and every process it forks inherits it; a physical standby made by
//! pg_basebackup carries it, so events still in WAL after a failover verify.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::PathBuf;

use once_cell::sync::OnceCell;
use pgrx::pg_sys;

use outbox_core::message::{Key, KEY_LEN};

static KEY: OnceCell<Key> = OnceCell::new();

const FILE_NAME: &str = "outbox.key";

fn path() -> PathBuf {
    // SAFETY: DataDir is set by the postmaster before any library is loaded
    // and never changes; it is a NUL-terminated absolute path.
    let dir = unsafe { std::ffi::CStr::from_ptr(pg_sys::DataDir) };
    PathBuf::from(dir.to_string_lossy().into_owned()).join(FILE_NAME)
}

fn read() -> Result<Key, String> {
    let p = path();
    let bytes = std::fs::read(&p).map_err(|e| format!("could not read {}: {e}", p.display()))?;
    Key::from_file_bytes(&bytes)
        .ok_or_else(|| format!("{} has {} bytes, expected {KEY_LEN}", p.display(), bytes.len()))
}

fn create() -> Result<Key, String> {
    let p = path();
    let mut bytes = [0u8; KEY_LEN];
    // SAFETY: the buffer is KEY_LEN writable bytes.
    if !unsafe { pg_sys::pg_strong_random(bytes.as_mut_ptr().cast(), KEY_LEN) } {
        return Err("could not generate a random key".into());
    }
    let tmp = p.with_extension("key.tmp");
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &p)
    };
    write().map_err(|e| format!("could not create {}: {e}", p.display()))?;
    Ok(Key::new(bytes))
}

/// Called in the postmaster from `_PG_init`: load the key, creating it on
/// the first start. Failing here is fatal to startup, which is the right
/// time for a DBA to hear about an unwritable data directory.
pub fn init_in_postmaster() -> Result<(), String> {
    let key = match path().exists() {
        true => read()?,
        false => create()?,
    };
    let _ = KEY.set(key);
    Ok(())
}

/// The key, read from the file if this process did not inherit it.
pub fn get() -> Result<&'static Key, String> {
    KEY.get_or_try_init(read)
}
