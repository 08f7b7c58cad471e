//! The server's message-authentication key (see `outbox_core::message`).
//!
//! It lives in `$PGDATA/outbox.key` (mode 0600): readable by the server, not
//! by any role (reading files there takes superuser or pg_read_server_files,
//! and those can forge events anyway). The postmaster creates it on first
//! start and every process it forks inherits it; a physical standby made by
//! pg_basebackup carries it, so events still in WAL after a failover verify.
//!
//! A key is made only while no replication slot uses the outbox plugin. If
//! the file is missing while such a slot exists (a file-level restore that
//! left it out, say), the events in that slot's WAL were signed with the
//! lost key: a new key would fail every one of them. The relay then waits in
//! the state "key missing" until the file is restored or the slots dropped.

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

/// Makes and stores a new key; refuses if a key file appeared meanwhile.
pub fn create() -> Result<&'static Key, String> {
    let p = path();
    if p.exists() {
        return get();
    }
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
        std::fs::rename(&tmp, &p)?;
        // The rename is durable once the directory is synced.
        std::fs::File::open(p.parent().unwrap_or(std::path::Path::new(".")))?.sync_all()
    };
    write().map_err(|e| format!("could not create {}: {e}", p.display()))?;
    let _ = KEY.set(Key::new(bytes));
    get()
}

/// Slots on disk that use the outbox plugin, found before shared memory
/// holds any slot (the postmaster loads libraries before slots are read).
/// A slot's state file keeps its plugin as a 64-byte NUL-padded name after
/// the slot's own name; searching for that exact 64-byte pattern past the
/// name does not depend on the file's layout, which changes between majors.
fn outbox_slots_on_disk() -> Vec<String> {
    let mut plugin = [0u8; 64];
    plugin[..6].copy_from_slice(b"outbox");
    let dir = path().with_file_name("pg_replslot");
    let Ok(entries) = std::fs::read_dir(&dir) else { return Vec::new() };
    let mut found = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        // A drop interrupted by a crash leaves "<name>.tmp"; startup removes it.
        if name.ends_with(".tmp") {
            continue;
        }
        let Ok(bytes) = std::fs::read(e.path().join("state")) else { continue };
        // magic, checksum, version, length (16 bytes), then the slot's name (64).
        let after_name = bytes.get(16 + 64..).unwrap_or_default();
        // The window must start a name: the byte before it is not a name
        // character (so "pg_outbox" does not count as "outbox").
        let starts_a_name = |i: usize| i == 0 || !(after_name[i - 1].is_ascii_alphanumeric() || after_name[i - 1] == b'_');
        if after_name.windows(plugin.len()).enumerate().any(|(i, w)| w == plugin && starts_a_name(i)) {
            found.push(name);
        }
    }
    found
}

/// Called in the postmaster from `_PG_init`: load the key, creating it on
/// the first start. Failing here is fatal to startup, which is the right
/// time for a DBA to hear about an unwritable data directory.
pub fn init_in_postmaster() -> Result<(), String> {
    if path().exists() {
        let _ = KEY.set(read()?);
        return Ok(());
    }
    let slots = outbox_slots_on_disk();
    if slots.is_empty() {
        create()?;
    } else {
        // Not fatal: the server is needed to repair this. Nothing is
        // emitted (outbox_emit() refuses) or decoded until it is.
        pgrx::warning!(
            "outbox: {} is missing but replication slot(s) \"{}\" use the outbox plugin; no new key is made \
             (events in their WAL were signed with the old one). Restore the file from the backup this data \
             directory came from; see the README's runbook, \"The message key is missing\"",
            path().display(),
            slots.join("\", \"")
        );
    }
    Ok(())
}

/// The key, read from the file if this process did not inherit it.
pub fn get() -> Result<&'static Key, String> {
    KEY.get_or_try_init(read)
}
