//! The bytes `outbox_emit()` writes as a transactional logical decoding
//! message (prefix [`crate::MESSAGE_PREFIX`]), and their authentication.
//!
//! Layout, version 1:
//! ```text
//! [0]      format version (1)
//! [1..17]  tag: HMAC-SHA256(key, version || body), first 16 bytes
//! [17..]   body: the event's fields (see codec.rs)
//! ```
//! The version comes first so that a backlog written by an older release
//! still decodes after `ALTER EXTENSION UPDATE`: a new release keeps a decoder
//! for every version it may find in retained WAL.
//!
//! Why a tag: in PostgreSQL 15 any role may call `pg_logical_emit_message()`,
//! so without it any role could forge an event with our prefix. The key lives
//! in a file in the data directory that only the server can read.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::codec::{self, CodecError, Reader};
use crate::Event;

pub const VERSION_1: u8 = 1;
/// Version 2: the payload may be absent (a tombstone). Written only for
/// tombstones, so that a release that predates them refuses such a message
/// by its version rather than misreading it.
pub const VERSION_2: u8 = 2;
pub const KEY_LEN: usize = 32;
const TAG_LEN: usize = 16;
const HEADER_LEN: usize = 1 + TAG_LEN;

/// The server's secret message-authentication key, kept as the HMAC state
/// after absorbing the key, so each event costs only its own bytes.
#[derive(Clone)]
pub struct Key(Hmac<Sha256>);

impl Key {
    pub fn new(bytes: [u8; KEY_LEN]) -> Self {
        // new_from_slice only fails for key lengths HMAC cannot take; any
        // length is fine for HMAC-SHA256, so the fallback is unreachable.
        Key(<Hmac<Sha256> as Mac>::new_from_slice(&bytes).unwrap_or_else(|_| unreachable!("HMAC accepts any key length")))
    }

    /// Reads a key file's contents: exactly [`KEY_LEN`] bytes.
    pub fn from_file_bytes(bytes: &[u8]) -> Option<Self> {
        <[u8; KEY_LEN]>::try_from(bytes).ok().map(Key::new)
    }

    fn tag(&self, version: u8, body: &[u8]) -> [u8; TAG_LEN] {
        let mut mac = self.0.clone();
        mac.update(&[version]);
        mac.update(body);
        let full = mac.finalize().into_bytes();
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&full[..TAG_LEN]);
        tag
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    #[error("empty message")]
    Empty,
    #[error("unknown format version {0}: not written by outbox_emit() of this release (forged, or from a newer release)")]
    UnknownVersion(u8),
    #[error("authentication failed: not written by outbox_emit() on this server")]
    BadTag,
    #[error("malformed: {0}")]
    Malformed(#[from] CodecError),
}

/// Encodes and signs an event. The result is what goes into the WAL.
pub fn encode(key: &Key, ev: &Event<'_>) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + codec::event_len(ev));
    let version = if ev.payload.is_none() { VERSION_2 } else { VERSION_1 };
    out.push(version);
    out.extend_from_slice(&[0u8; TAG_LEN]);
    codec::put_event(&mut out, ev);
    let tag = key.tag(version, &out[HEADER_LEN..]);
    out[1..HEADER_LEN].copy_from_slice(&tag);
    out
}

/// Verifies and decodes a message; the event borrows from `bytes`.
pub fn decode<'a>(key: &Key, bytes: &'a [u8]) -> Result<Event<'a>, MessageError> {
    let (&version, rest) = bytes.split_first().ok_or(MessageError::Empty)?;
    if version != VERSION_1 && version != VERSION_2 {
        return Err(MessageError::UnknownVersion(version));
    }
    if rest.len() < TAG_LEN {
        return Err(CodecError::Truncated { offset: bytes.len(), needed: TAG_LEN - rest.len() }.into());
    }
    let (tag, body) = rest.split_at(TAG_LEN);
    // Constant-time comparison: the tag is a secret-derived value.
    let expected = key.tag(version, body);
    let diff = tag.iter().zip(expected.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b));
    if diff != 0 {
        return Err(MessageError::BadTag);
    }
    let mut r = Reader::new(body);
    let ev = r.event()?;
    r.finish()?;
    tombstone_only_in_version_2(version, ev)
}

/// A version-1 message always has a payload.
fn tombstone_only_in_version_2(version: u8, ev: Event<'_>) -> Result<Event<'_>, MessageError> {
    if version == VERSION_1 && ev.payload.is_none() {
        return Err(MessageError::Malformed(CodecError::Trailing(0)));
    }
    Ok(ev)
}

/// Decodes a message's event without verifying its tag: for a message that
/// failed [`decode`] with [`MessageError::BadTag`], so that what it claims
/// to be can be kept (as a dead letter) and named, never published.
pub fn decode_unverified(bytes: &[u8]) -> Result<Event<'_>, MessageError> {
    let (&version, rest) = bytes.split_first().ok_or(MessageError::Empty)?;
    if version != VERSION_1 && version != VERSION_2 {
        return Err(MessageError::UnknownVersion(version));
    }
    if rest.len() < TAG_LEN {
        return Err(CodecError::Truncated { offset: bytes.len(), needed: TAG_LEN - rest.len() }.into());
    }
    let mut r = Reader::new(&rest[TAG_LEN..]);
    let ev = r.event()?;
    r.finish()?;
    tombstone_only_in_version_2(version, ev)
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_event_under_another_key_decodes_unverified_only() {
        let other = Key::new(*b"another key, another server.....");
        let bytes = encode(&other, &sample());
        assert_eq!(decode(&key(), &bytes), Err(MessageError::BadTag));
        assert_eq!(decode_unverified(&bytes).unwrap(), sample());
        assert!(matches!(decode_unverified(b"\x01short"), Err(MessageError::Malformed(_))));
        assert_eq!(decode_unverified(b"\x07xxxxxxxxxxxxxxxxxxxx"), Err(MessageError::UnknownVersion(7)));
    }

    use super::*;

    fn key() -> Key {
        Key::new(*b"0123456789abcdef0123456789abcdef")
    }

    fn sample() -> Event<'static> {
        Event {
            id: [0x11; 16],
            aggregate_type: "Order",
            aggregate_id: "42",
            event_type: "OrderPlaced",
            topic: None,
            headers: vec![("trace", "t1")],
            payload: Some(r#"{"total": 4200}"#),
        }
    }

    /// The version-1 layout is a contract with WAL already on disk: if this
    /// test has to change, add VERSION_2 and keep decoding VERSION_1.
    #[test]
    fn golden_version_1() {
        let bytes = encode(&key(), &sample());
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            concat!(
                "01",
                "f7a87dcd899798d0345185ad421846dc",
                "11111111111111111111111111111111",
                "05000000", "4f72646572",
                "02000000", "3432",
                "0b000000", "4f72646572506c61636564",
                "ffffffff",
                "01000000", "05000000", "7472616365", "02000000", "7431",
                "0f000000", "7b22746f74616c223a20343230307d",
            )
        );
        assert_eq!(decode(&key(), &bytes).unwrap(), sample());
    }

    #[test]
    fn a_tombstone_is_version_2_and_only_there_may_the_payload_be_absent() {
        let tomb = Event { payload: None, ..sample() };
        let bytes = encode(&key(), &tomb);
        assert_eq!(bytes[0], VERSION_2);
        assert_eq!(decode(&key(), &bytes).unwrap(), tomb);
        // The same body under version 1 (signed as such) is malformed.
        let mut v1 = bytes.clone();
        v1[0] = VERSION_1;
        let tag = key().tag(VERSION_1, &v1[HEADER_LEN..]);
        v1[1..HEADER_LEN].copy_from_slice(&tag);
        assert!(matches!(decode(&key(), &v1), Err(MessageError::Malformed(_))));
    }

    #[test]
    fn a_forged_or_altered_message_is_rejected() {
        let mut bytes = encode(&key(), &sample());
        let other = Key::new([9; KEY_LEN]);
        assert_eq!(decode(&other, &bytes), Err(MessageError::BadTag));
        let last = bytes.len() - 2;
        bytes[last] ^= 1;
        assert_eq!(decode(&key(), &bytes), Err(MessageError::BadTag));
    }

    #[test]
    fn unknown_versions_and_garbage_are_errors() {
        assert_eq!(decode(&key(), &[]), Err(MessageError::Empty));
        assert_eq!(decode(&key(), &[3, 0, 0]), Err(MessageError::UnknownVersion(3)));
        assert!(matches!(decode(&key(), &[1, 0, 0]), Err(MessageError::Malformed(_))));
        let bytes = encode(&key(), &sample());
        for cut in 0..bytes.len() {
            assert!(decode(&key(), &bytes[..cut]).is_err());
        }
    }

    #[test]
    fn key_file_must_have_exact_length() {
        assert!(Key::from_file_bytes(&[0; 31]).is_none());
        assert!(Key::from_file_bytes(&[0; 32]).is_some());
    }
}
