//! Turning core errors into Postgres errors with a SQLSTATE and a hint.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;

use outbox_core::validate::{Invalid, Kind};

pub fn raise(code: PgSqlErrorCode, message: impl Into<String>, detail: Option<String>, hint: Option<String>) -> ! {
    let mut r = ErrorReport::new(code, message.into(), "outbox");
    if let Some(d) = detail {
        r = r.set_detail(d);
    }
    if let Some(h) = hint {
        r = r.set_hint(h);
    }
    r.report(PgLogLevel::ERROR);
    unreachable!("ERROR does not return")
}

pub fn raise_invalid(e: Invalid) -> ! {
    let code = match e.kind {
        Kind::Null => PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
        Kind::InvalidValue => PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
        Kind::TooLarge => PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
    };
    raise(code, e.message, None, Some(e.hint))
}
