//! Length-prefixed field encoding shared by the WAL message format
//! ([`crate::message`]) and the output plugin's format ([`crate::decoded`]).
//!
//! Little-endian, `u32` lengths, no alignment: the formats are read far more
//! often than written, and a fixed, boring layout is cheap to read in place
//! without copying.

use crate::Event;

/// Marks an absent optional string (an event without a topic override).
const ABSENT: u32 = u32::MAX;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("truncated: needed {needed} more bytes at offset {offset}")]
    Truncated { offset: usize, needed: usize },
    #[error("field at offset {offset} is not valid UTF-8")]
    NotUtf8 { offset: usize },
    #[error("{0} bytes of trailing garbage")]
    Trailing(usize),
}

pub(crate) fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

pub(crate) fn put_str(out: &mut Vec<u8>, s: &str) {
    put_u32(out, s.len() as u32);
    out.extend_from_slice(s.as_bytes());
}

pub(crate) fn put_opt_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => put_str(out, s),
        None => put_u32(out, ABSENT),
    }
}

pub(crate) fn put_opt_bytes(out: &mut Vec<u8>, b: Option<&[u8]>) {
    match b {
        Some(b) => {
            put_u32(out, b.len() as u32);
            out.extend_from_slice(b);
        }
        None => put_u32(out, ABSENT),
    }
}

/// Appends the event's fields (everything but framing and authentication).
pub(crate) fn put_event(out: &mut Vec<u8>, ev: &Event<'_>) {
    out.extend_from_slice(&ev.id);
    put_str(out, ev.aggregate_type);
    put_str(out, ev.aggregate_id);
    put_str(out, ev.event_type);
    put_opt_str(out, ev.topic);
    put_headers(out, &ev.headers);
    put_opt_str(out, ev.payload);
}

pub(crate) fn put_headers(out: &mut Vec<u8>, headers: &[(&str, &str)]) {
    put_u32(out, headers.len() as u32);
    for (k, v) in headers {
        put_str(out, k);
        put_str(out, v);
    }
}

/// The exact number of bytes [`put_event`] appends, so buffers are sized once.
pub(crate) fn event_len(ev: &Event<'_>) -> usize {
    16 + 4 * 6
        + ev.aggregate_type.len()
        + ev.aggregate_id.len()
        + ev.event_type.len()
        + ev.topic.map_or(0, str::len)
        + ev.headers.iter().map(|(k, v)| 8 + k.len() + v.len()).sum::<usize>()
        + ev.payload.map_or(0, str::len)
}

/// A cursor over an encoded buffer that hands out borrowed fields.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Result<&'a [u8], CodecError> {
        let rest = self.buf.len() - self.pos;
        if rest < n {
            return Err(CodecError::Truncated { offset: self.pos, needed: n - rest });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], CodecError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N)?);
        Ok(a)
    }

    pub(crate) fn u32(&mut self) -> Result<u32, CodecError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, CodecError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    pub(crate) fn i64(&mut self) -> Result<i64, CodecError> {
        Ok(i64::from_le_bytes(self.array()?))
    }

    fn str_of_len(&mut self, n: usize) -> Result<&'a str, CodecError> {
        let offset = self.pos;
        std::str::from_utf8(self.bytes(n)?).map_err(|_| CodecError::NotUtf8 { offset })
    }

    pub(crate) fn str(&mut self) -> Result<&'a str, CodecError> {
        let n = self.u32()? as usize;
        self.str_of_len(n)
    }

    pub(crate) fn opt_bytes(&mut self) -> Result<Option<&'a [u8]>, CodecError> {
        match self.u32()? {
            ABSENT => Ok(None),
            n => self.bytes(n as usize).map(Some),
        }
    }

    pub(crate) fn opt_str(&mut self) -> Result<Option<&'a str>, CodecError> {
        match self.u32()? {
            ABSENT => Ok(None),
            n => self.str_of_len(n as usize).map(Some),
        }
    }

    pub(crate) fn event(&mut self) -> Result<Event<'a>, CodecError> {
        let id = self.array()?;
        let aggregate_type = self.str()?;
        let aggregate_id = self.str()?;
        let event_type = self.str()?;
        let topic = self.opt_str()?;
        let headers = self.headers()?;
        let payload = self.opt_str()?;
        Ok(Event { id, aggregate_type, aggregate_id, event_type, topic, headers, payload })
    }

    pub(crate) fn headers(&mut self) -> Result<Vec<(&'a str, &'a str)>, CodecError> {
        let n = self.u32()? as usize;
        // Bound the allocation by what the buffer can hold, not by a length
        // field an attacker or a torn record chose.
        let mut headers = Vec::with_capacity(n.min(self.remaining() / 8));
        for _ in 0..n {
            headers.push((self.str()?, self.str()?));
        }
        Ok(headers)
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub(crate) fn finish(&self) -> Result<(), CodecError> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(CodecError::Trailing(n)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Event<'static> {
        Event {
            id: [7; 16],
            aggregate_type: "Order",
            aggregate_id: "42",
            event_type: "OrderPlaced",
            topic: Some("orders"),
            headers: vec![("trace", "abc"), ("tenant", "é")],
            payload: Some(r#"{"total": 4200}"#),
        }
    }

    #[test]
    fn event_round_trips_and_len_is_exact() {
        for (topic, payload) in [(Some("orders"), Some("{}")), (None, Some("[]")), (None, None)] {
            let ev = Event { topic, payload, ..sample() };
            let mut out = Vec::new();
            put_event(&mut out, &ev);
            assert_eq!(out.len(), event_len(&ev));
            let mut r = Reader::new(&out);
            assert_eq!(r.event().unwrap(), ev);
            r.finish().unwrap();
        }
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let mut out = Vec::new();
        put_event(&mut out, &sample());
        for cut in 0..out.len() {
            assert!(Reader::new(&out[..cut]).event().is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn absurd_header_count_does_not_allocate_it() {
        let mut out = vec![0u8; 16];
        for _ in 0..3 {
            put_str(&mut out, "x");
        }
        put_u32(&mut out, ABSENT);
        put_u32(&mut out, u32::MAX - 1);
        assert!(matches!(Reader::new(&out).event(), Err(CodecError::Truncated { .. })));
    }

    #[test]
    fn invalid_utf8_is_reported_with_its_offset() {
        let mut out = vec![0u8; 16];
        put_u32(&mut out, 2);
        out.extend_from_slice(&[0xff, 0xfe]);
        assert_eq!(Reader::new(&out).event(), Err(CodecError::NotUtf8 { offset: 20 }));
    }
}
