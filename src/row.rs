//! Reading an outbox table row (Debezium's columns plus `headers`) into the
//! fields of an event. Shared by the table's insert guard, which validates
//! the row, and the output plugin, which decodes inserted rows.

use std::ffi::CStr;
use std::num::NonZeroUsize;

use pgrx::pg_sys;

/// An outbox table row's event fields; NULL columns are `None`.
pub struct Row {
    pub id: Option<[u8; 16]>,
    pub aggregate_type: Option<String>,
    pub aggregate_id: Option<String>,
    pub event_type: Option<String>,
    /// The payload as jsonb's text output.
    pub payload: Option<String>,
    pub headers: Option<serde_json::Value>,
}

/// Reads the row. The column set is the extension's own table, so a missing
/// column means someone altered it: reported as an error naming the column.
///
/// # Safety
/// `tuple` and `desc` must be a valid heap tuple and its descriptor, and the
/// call must happen in a backend with a current memory context (values are
/// detoasted and printed with palloc).
pub unsafe fn read(tuple: pg_sys::HeapTuple, desc: pg_sys::TupleDesc) -> Result<Row, String> {
    // SAFETY: the caller guarantees tuple and desc; each accessor below only
    // reads attributes by the numbers Postgres itself reports for the names.
    unsafe {
        let datum = |name: &CStr| -> Result<Option<pg_sys::Datum>, String> {
            let attno = pg_sys::SPI_fnumber(desc, name.as_ptr());
            let attno = usize::try_from(attno)
                .ok()
                .and_then(NonZeroUsize::new)
                .ok_or_else(|| format!("the outbox table has no column \"{}\"", name.to_string_lossy()))?;
            Ok(pgrx::heap_getattr_raw(tuple, attno, desc))
        };
        let text = |name: &CStr| -> Result<Option<String>, String> {
            Ok(datum(name)?.map(|d| {
                let s = pg_sys::text_to_cstring(d.cast_mut_ptr());
                let out = CStr::from_ptr(s).to_string_lossy().into_owned();
                pg_sys::pfree(s.cast());
                out
            }))
        };
        let id = datum(c"id")?.map(|d| {
            let mut b = [0u8; 16];
            b.copy_from_slice(std::slice::from_raw_parts(d.cast_mut_ptr::<u8>(), 16));
            b
        });
        let headers = match datum(c"headers")?.map(|d| jsonb_text(d)) {
            None => None,
            Some(s) => Some(serde_json::from_str(&s).map_err(|e| format!("headers are not JSON: {e}"))?),
        };
        Ok(Row {
            id,
            aggregate_type: text(c"aggregatetype")?,
            aggregate_id: text(c"aggregateid")?,
            event_type: text(c"type")?,
            payload: datum(c"payload")?.map(|d| jsonb_text(d)),
            headers,
        })
    }
}

/// jsonb's text output, exactly as `payload::text` would print it.
///
/// # Safety
/// `d` must be a jsonb datum (possibly toasted).
pub unsafe fn jsonb_text(d: pg_sys::Datum) -> String {
    // SAFETY: jsonb_out takes one jsonb argument and returns a palloc'd
    // C string; the caller guarantees d is jsonb.
    unsafe {
        let out = pgrx::direct_function_call_as_datum(pg_sys::jsonb_out, &[Some(d)])
            .unwrap_or_else(|| unreachable!("jsonb_out never returns NULL for a non-NULL input"));
        let p = out.cast_mut_ptr::<std::ffi::c_char>();
        let s = CStr::from_ptr(p).to_string_lossy().into_owned();
        pg_sys::pfree(p.cast());
        s
    }
}
